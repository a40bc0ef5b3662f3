//! Gathers a worker's messages to the engine (bids, claims, reports) into packs, over a broker
//! that packs them (see `Broker::publish_packed`): a JetStream message costs the NATS server
//! the same whether it carries one event or fifty.
//!
//! No message waits for company: one task publishes, and whatever was sent while its previous
//! publish was on the way goes in the next one. An idle worker thus publishes each message at
//! once, and a busy one in packs that grow with the broker's round trip, as a group commit does.

use std::sync::Arc;

use capstan_brokers::{Broker, Error, Message};
use tokio::sync::{mpsc, oneshot};

/// At most this many messages in one publish.
const MAX_GATHERED: usize = 256;

type Reply = oneshot::Sender<Result<(), Error>>;

/// The sending side of the gathering task; clones share it. The task ends once every clone is
/// dropped and what they sent is published.
#[derive(Clone)]
pub(crate) struct Gather {
    tx: mpsc::UnboundedSender<(Message, Reply)>,
}

impl Gather {
    /// Starts the task that publishes to `broker`.
    pub(crate) fn start(broker: Arc<dyn Broker>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish_gathered(broker, rx));
        Gather { tx }
    }

    /// Publishes `message` with whatever else is waiting; returns once the broker confirmed it.
    pub(crate) async fn publish(&self, message: Message) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((message, reply)).map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }
}

async fn publish_gathered(broker: Arc<dyn Broker>, mut rx: mpsc::UnboundedReceiver<(Message, Reply)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_GATHERED).await > 0 {
        let (messages, mut replies): (Vec<Message>, Vec<Reply>) = std::mem::take(&mut batch).into_iter().unzip();
        if messages.len() == 1
            && let Some(reply) = replies.pop()
        {
            let _ = reply.send(broker.publish_packed(&messages).await);
            continue;
        }
        tracing::trace!(messages = messages.len(), "publishing gathered messages");
        match broker.publish_packed(&messages).await {
            Ok(()) => replies.into_iter().for_each(|r| _ = r.send(Ok(()))),
            // A pack answers as a whole: each is sent again alone, so that one over the
            // broker's limit fails alone (its sender reports that instead).
            Err(e) => {
                tracing::debug!(error = %e, messages = messages.len(), "a pack failed; sending each alone");
                for (message, reply) in messages.into_iter().zip(replies) {
                    let _ = reply.send(broker.publish(vec![message]).await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use capstan_brokers::{Subscription, SubscriptionMode};
    use capstan_proto::CloudEvent;

    use super::*;

    /// Records each call: how the messages went (alone or packed) and their ids. A message
    /// with the id `big` is over the limit, and fails any call that carries it.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(&'static str, Vec<String>)>>,
    }

    impl Recorder {
        fn record(&self, how: &'static str, messages: &[Message]) -> capstan_brokers::Result<()> {
            let ids: Vec<String> = messages.iter().map(|m| m.event.id.clone()).collect();
            let big = ids.iter().any(|id| id == "big");
            self.calls.lock().unwrap().push((how, ids));
            match big {
                true => Err(Error::TooLarge { size: 2_000_000, limit: 1_000_000 }),
                false => Ok(()),
            }
        }

        fn calls(&self) -> Vec<(&'static str, Vec<String>)> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Broker for Recorder {
        async fn publish(&self, messages: Vec<Message>) -> capstan_brokers::Result<()> {
            self.record("alone", &messages)
        }

        async fn subscribe(&self, _: &str, _: SubscriptionMode) -> capstan_brokers::Result<Box<dyn Subscription>> {
            Err(Error::Invalid("not in this test".into()))
        }

        fn packs(&self) -> bool {
            true
        }

        async fn publish_packed(&self, messages: &[Message]) -> capstan_brokers::Result<()> {
            self.record("packed", messages)
        }
    }

    fn message(id: &str) -> Message {
        Message { topic: "capstan.inputs".into(), key: "run".into(), event: CloudEvent::new(id, "test", "t") }
    }

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn messages_sent_while_the_task_is_busy_go_in_one_pack() {
        let broker = Arc::new(Recorder::default());
        let gather = Gather::start(broker.clone());
        let (a, b, c) =
            tokio::join!(gather.publish(message("a")), gather.publish(message("b")), gather.publish(message("c")));
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        gather.publish(message("d")).await.unwrap();
        assert_eq!(broker.calls(), vec![("packed", ids(&["a", "b", "c"])), ("packed", ids(&["d"]))]);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_fails_alone_and_its_pack_mates_are_sent() {
        let broker = Arc::new(Recorder::default());
        let gather = Gather::start(broker.clone());
        let (a, big, c) =
            tokio::join!(gather.publish(message("a")), gather.publish(message("big")), gather.publish(message("c")));
        assert!(a.is_ok() && c.is_ok(), "{a:?} {c:?}");
        assert!(matches!(big, Err(Error::TooLarge { .. })), "{big:?}");
        let calls = broker.calls();
        assert_eq!(calls[0], ("packed", ids(&["a", "big", "c"])));
        assert_eq!(calls[1..], [("alone", ids(&["a"])), ("alone", ids(&["big"])), ("alone", ids(&["c"]))]);
    }
}
