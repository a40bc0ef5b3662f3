//! The gRPC front end (`capstan.v1`): thin tonic services over [`Api`], plus standard health
//! checking and server reflection so grpcurl works without the .proto files. Tokens come in the
//! `authorization: Bearer <token>` metadata.

use std::collections::BTreeMap;
use std::time::Duration;

use capstan_engine::run::Input;
use capstan_engine::slo;
use capstan_proto::grpc::v1 as pb;
use pb::definition_service_server::{DefinitionService, DefinitionServiceServer};
use pb::evaluation_service_server::{EvaluationService, EvaluationServiceServer};
use pb::event_service_server::{EventService, EventServiceServer};
use pb::run_service_server::{RunService, RunServiceServer};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::{Role, bearer};
use super::convert;
use super::error::ApiError;
use super::ops::{Api, ListQuery};
use super::view::task_views;
use crate::runtime::TriggerRequest;

/// How often a watcher looks for new events at most, and at least when nothing happens.
const WATCH_MIN_POLL: Duration = Duration::from_millis(20);
const WATCH_MAX_POLL: Duration = Duration::from_millis(500);

/// The largest message tonic decodes at all.
const HARD_DECODING_LIMIT: usize = 8 * 1024 * 1024;

/// The services of `capstan.v1`, sharing one [`Api`].
#[derive(Clone)]
pub struct Grpc {
    api: Api,
    /// Turns true when the server stops, to end open watch streams.
    stopping: watch::Receiver<bool>,
}

impl Grpc {
    /// Services over `api`; watch streams end when `stopping` turns true.
    pub fn new(api: Api, stopping: watch::Receiver<bool>) -> Self {
        Grpc { api, stopping }
    }

    /// The router with every service, health and reflection.
    pub fn router(self) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
        // Decoding stops far above the configured limit; the limit itself is checked per request
        // so that it can answer ResourceExhausted with the sizes (tonic's own check answers
        // OutOfRange).
        let hard = self.api.limits.max_body_bytes().saturating_mul(4).max(HARD_DECODING_LIMIT);
        // Both reflection versions: older grpcurl and grpcio clients only ask v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(capstan_proto::grpc::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let (reporter, health) = tonic_health::server::health_reporter();
        // Every service is served as soon as the router exists; tonic-health answers SERVING for
        // the empty name and for each named service registered here.
        tokio::spawn(async move {
            reporter.set_serving::<RunServiceServer<Grpc>>().await;
            reporter.set_serving::<DefinitionServiceServer<Grpc>>().await;
            reporter.set_serving::<EventServiceServer<Grpc>>().await;
            reporter.set_serving::<EvaluationServiceServer<Grpc>>().await;
        });
        let routes = tonic::service::Routes::new(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(DefinitionServiceServer::new(self.clone()).max_decoding_message_size(hard))
            .add_service(RunServiceServer::new(self.clone()).max_decoding_message_size(hard))
            .add_service(EventServiceServer::new(self.clone()).max_decoding_message_size(hard))
            .add_service(EvaluationServiceServer::new(self).max_decoding_message_size(hard));
        Ok(routes)
    }

    fn check_size<M: Message>(&self, request: &Request<M>) -> Result<(), ApiError> {
        let size = request.get_ref().encoded_len();
        let limit = self.api.limits.max_body_bytes();
        if size > limit {
            return Err(ApiError::TooLarge(format!("request is {size} bytes, more than the limit of {limit}")));
        }
        Ok(())
    }
}

/// The bearer token of a request, if any.
fn token<M>(request: &Request<M>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    bearer(value).map(str::to_string)
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl DefinitionService for Grpc {
    async fn apply(&self, request: Request<pb::ApplyDefinitionRequest>) -> Reply<pb::ApplyDefinitionResponse> {
        self.check_size(&request)?;
        let token = token(&request);
        let r = request.into_inner();
        let (name, version) = self.api.apply(token.as_deref(), &r.project, &r.source).await?;
        Ok(Response::new(pb::ApplyDefinitionResponse { name, version }))
    }

    async fn get(&self, request: Request<pb::GetDefinitionRequest>) -> Reply<pb::Definition> {
        let token = token(&request);
        let r = request.into_inner();
        let d = self.api.get_definition(token.as_deref(), &r.project, &r.name, r.version).await?;
        Ok(Response::new(convert::definition(d)))
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListDefinitionVersionsRequest>,
    ) -> Reply<pb::ListDefinitionVersionsResponse> {
        let token = token(&request);
        let r = request.into_inner();
        let versions = self.api.list_versions(token.as_deref(), &r.project, &r.name).await?;
        Ok(Response::new(pb::ListDefinitionVersionsResponse {
            versions: versions.into_iter().map(convert::definition).collect(),
        }))
    }

    async fn validate(&self, request: Request<pb::ValidateDefinitionRequest>) -> Reply<pb::ValidateDefinitionResponse> {
        self.check_size(&request)?;
        let token = token(&request);
        let v = self.api.validate(token.as_deref(), &request.get_ref().source)?;
        Ok(Response::new(pb::ValidateDefinitionResponse {
            valid: v.problems.is_empty(),
            problems: v.problems,
            summary: v.summary,
            name: v.name,
        }))
    }
}

#[tonic::async_trait]
impl RunService for Grpc {
    type WatchStream = ReceiverStream<Result<pb::RunEvent, Status>>;

    async fn trigger(&self, request: Request<pb::TriggerRunRequest>) -> Reply<pb::TriggerRunResponse> {
        self.check_size(&request)?;
        let token = token(&request);
        let r = request.into_inner();
        let req = TriggerRequest {
            data: convert::trigger_data(r.data.as_ref())?,
            project: r.project,
            definition: Some(r.definition).filter(|d| !d.is_empty()),
            stage: r.stage,
            sequence: r.sequence,
            service: Some(r.service).filter(|s| !s.is_empty()),
            context_id: Some(r.context_id).filter(|c| !c.is_empty()),
            request_id: Some(r.request_id).filter(|c| !c.is_empty()),
        };
        let run_id = self.api.trigger(token.as_deref(), req).await?;
        Ok(Response::new(pb::TriggerRunResponse { run_id }))
    }

    async fn get(&self, request: Request<pb::GetRunRequest>) -> Reply<pb::Run> {
        let token = token(&request);
        let r = request.into_inner();
        let (record, _) = self.api.run(token.as_deref(), &r.project, &r.run_id, Role::Viewer).await?;
        let events = self.api.events(&r.run_id, 1).await?;
        Ok(Response::new(convert::run(record, task_views(&events))))
    }

    async fn list(&self, request: Request<pb::ListRunsRequest>) -> Reply<pb::ListRunsResponse> {
        let token = token(&request);
        let r = request.into_inner();
        let query = ListQuery {
            project: r.project,
            stage: r.stage,
            sequence: r.sequence,
            service: r.service,
            status: r.status,
            context_id: r.context_id,
            page_size: usize::try_from(r.page_size)
                .map_err(|_| ApiError::invalid("page_size", "must not be negative"))?,
            page_token: r.page_token,
        };
        let (runs, next_page_token) = self.api.list(token.as_deref(), &query).await?;
        let runs = runs.into_iter().map(|r| convert::run(r, Vec::new())).collect();
        Ok(Response::new(pb::ListRunsResponse { runs, next_page_token }))
    }

    async fn watch(&self, request: Request<pb::WatchRunRequest>) -> Reply<Self::WatchStream> {
        let token = token(&request);
        let r = request.into_inner();
        self.api.run(token.as_deref(), &r.project, &r.run_id, Role::Viewer).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(follow(self.api.clone(), r.run_id, r.from_seq.max(1), tx, self.stopping.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel(&self, request: Request<pb::CancelRunRequest>) -> Reply<pb::RunCommandResponse> {
        let token = token(&request);
        let r = request.into_inner();
        let reason = if r.reason.is_empty() { "cancelled through the API".to_string() } else { r.reason };
        let applied = self.api.command(token.as_deref(), &r.project, &r.run_id, Input::Cancel { reason }).await?;
        Ok(Response::new(command_response(applied)))
    }

    async fn pause(&self, request: Request<pb::RunRef>) -> Reply<pb::RunCommandResponse> {
        let token = token(&request);
        let r = request.into_inner();
        let applied = self.api.command(token.as_deref(), &r.project, &r.run_id, Input::Pause).await?;
        Ok(Response::new(command_response(applied)))
    }

    async fn resume(&self, request: Request<pb::RunRef>) -> Reply<pb::RunCommandResponse> {
        let token = token(&request);
        let r = request.into_inner();
        let applied = self.api.command(token.as_deref(), &r.project, &r.run_id, Input::Resume).await?;
        Ok(Response::new(command_response(applied)))
    }

    async fn approve(&self, request: Request<pb::ApproveRequest>) -> Reply<pb::RunCommandResponse> {
        let token = token(&request);
        let r = request.into_inner();
        let applied = self.api.approve(token.as_deref(), &r.project, &r.run_id, &r.task, !r.reject).await?;
        Ok(Response::new(command_response(applied)))
    }
}

fn command_response(applied: crate::runtime::Applied) -> pb::RunCommandResponse {
    pb::RunCommandResponse { run_id: applied.run_id, events: applied.events as u64, version: applied.version }
}

/// Sends a run's events from `next` on until the run ends, the client goes away or the server
/// stops. The store is polled with a backoff: the event log is the truth, and a watcher that
/// falls behind or reconnects reads exactly what it missed.
async fn follow(
    api: Api,
    run_id: String,
    mut next: i64,
    tx: mpsc::Sender<Result<pb::RunEvent, Status>>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut pause = WATCH_MIN_POLL;
    loop {
        let events = match api.events(&run_id, next).await {
            Ok(e) => e,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let mut ended = false;
        let got = !events.is_empty();
        for e in events {
            next = e.seq + 1;
            ended |= e.kind == "run-finished";
            if tx.send(Ok(convert::run_event(e))).await.is_err() {
                return;
            }
        }
        if ended {
            return;
        }
        pause = if got { WATCH_MIN_POLL } else { (pause * 2).min(WATCH_MAX_POLL) };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = tx.closed() => return,
            _ = async { stopping.wait_for(|s| *s).await.is_ok() } => {
                let _ = tx.send(Err(Status::unavailable("the server is shutting down; watch again from the last seq"))).await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl EventService for Grpc {
    async fn publish(&self, request: Request<pb::PublishEventRequest>) -> Reply<pb::PublishEventResponse> {
        self.check_size(&request)?;
        let token = token(&request);
        let r = request.into_inner();
        let event = r.event.ok_or_else(|| ApiError::missing("event"))?;
        let event = convert::cloud_event(&event)?;
        let published = self.api.publish(token.as_deref(), &r.project, &event).await?;
        Ok(Response::new(pb::PublishEventResponse { run_id: published.run_id, project: published.project }))
    }
}

#[tonic::async_trait]
impl EvaluationService for Grpc {
    async fn evaluate(&self, request: Request<pb::EvaluateRequest>) -> Reply<pb::EvaluateResponse> {
        self.check_size(&request)?;
        let token = token(&request);
        let r = request.into_inner();
        let values: BTreeMap<String, f64> = r.values.into_iter().collect();
        let mut previous = Vec::new();
        for (i, p) in r.previous.into_iter().enumerate() {
            let result = serde_json::from_value(serde_json::Value::String(p.result.clone())).map_err(|_| {
                ApiError::invalid(
                    &format!("previous[{i}].result"),
                    format!("`{}` is not pass, warning or fail", p.result),
                )
            })?;
            previous.push(slo::PreviousResult { result, values: p.values.into_iter().collect() });
        }
        let evaluation = self.api.evaluate(token.as_deref(), &r.slo_yaml, &values, &previous)?;
        Ok(Response::new(pb::EvaluateResponse {
            score: evaluation.score,
            result: evaluation.result.as_str().to_string(),
            evaluation_json: serde_json::to_string(&evaluation).unwrap_or_default(),
            table: slo::render_table(&evaluation),
        }))
    }
}
