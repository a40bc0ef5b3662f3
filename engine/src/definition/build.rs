//! From the file as written (`raw`) to the model: defaults of the flavor, implicit dependencies,
//! durations, dispatch settings. Problems of single values are collected here; problems between
//! elements (duplicates, unknown names, cycles) are left to `validate`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Map;
use serde_yaml::{Mapping, Value};

use super::diagnostic::{Diagnostics, Place};
use super::model::{
    AwardPolicy, Definition, DispatchMode, Flavor, RetryPolicy, Runbook, Sequence, Stage, Task, Timeouts, Trigger,
};
use super::raw::{
    RawRequires, RawRetry, RawRunbook, RawSequence, RawShipyard, RawStage, RawTask, RawTimeouts, RawTrigger, key_names,
    scalar_text,
};
use crate::remediation::ProblemRemediation;

/// The name of a runbook's escalation task in its runs.
pub const ESCALATION: &str = "escalation";
use super::selector::selector;
use crate::duration::{Millis, parse_duration};

/// Builds the definition, recording every problem of a single value in `out`.
pub(super) fn build(flavor: Flavor, raw: RawShipyard, out: &mut Diagnostics) -> Definition {
    let keptn = matches!(flavor, Flavor::Keptn { .. });
    let mut b = Builder { keptn, out };
    b.unknown(&raw.spec.unknown, Place::Document, "spec");
    let raw_stages = raw.spec.stages.unwrap_or_default();
    if raw_stages.is_empty() {
        b.out.push(Place::Document, "`spec.stages` is empty; a definition needs at least one stage");
    }
    let stages = raw_stages.into_iter().map(|stage| b.stage(stage)).collect();
    Definition { flavor, name: raw.metadata.name.unwrap_or_default(), stages }
}

struct Builder<'a> {
    keptn: bool,
    out: &'a mut Diagnostics,
}

impl Builder<'_> {
    /// Unknown keys are Capstan typos worth an error, but Keptn files must load unchanged.
    fn unknown(&mut self, keys: &Mapping, place: Place, within: &str) {
        if self.keptn {
            return;
        }
        for key in key_names(keys) {
            self.out.push(place.clone(), format!("unknown field `{key}` in {within}"));
        }
    }

    fn stage(&mut self, raw: RawStage) -> Stage {
        self.unknown(&raw.unknown, Place::stage(&raw.name), "stage");
        let sequences = raw.sequences.unwrap_or_default().into_iter().map(|q| self.sequence(&raw.name, q)).collect();
        Stage { name: raw.name, sequences }
    }

    fn sequence(&mut self, stage: &str, raw: RawSequence) -> Sequence {
        let place = Place::sequence(stage, &raw.name);
        self.unknown(&raw.unknown, place.clone(), "sequence");
        let triggered_on = raw
            .triggered_on
            .unwrap_or_default()
            .into_iter()
            .filter_map(|trigger| self.trigger(&place, trigger))
            .collect();
        let mut tasks: Vec<Arc<Task>> = Vec::new();
        for raw_task in raw.tasks.unwrap_or_default() {
            let previous = tasks.last().map(|t| t.name.clone());
            let task = self.task(stage, &raw.name, raw_task, previous);
            tasks.push(Arc::new(task));
        }
        let runbook = raw.runbook.and_then(|r| self.runbook(stage, &raw.name, r));
        Sequence { name: raw.name, triggered_on, tasks, runbook }
    }

    /// A sequence's `runbook`: Capstan's format only, instead of `tasks`.
    fn runbook(&mut self, stage: &str, sequence: &str, raw: RawRunbook) -> Option<Runbook> {
        let place = Place::sequence(stage, sequence);
        if self.keptn {
            self.out.push(place, "`runbook` needs `apiVersion: capstan.dev/v1`; Keptn remediates with a sequence");
            return None;
        }
        self.unknown(&raw.unknown, place.clone(), "runbook");
        let remediations = match raw.remediations.map(serde_yaml::from_value::<Vec<ProblemRemediation>>) {
            Some(Ok(list)) => list,
            Some(Err(why)) => {
                self.out.push(place.clone(), format!("`runbook.remediations` is not a list of problem types: {why}"));
                Vec::new()
            }
            None => Vec::new(),
        };
        for problem in crate::remediation::problems(&remediations, "runbook.remediations") {
            self.out.push(place.clone(), problem);
        }
        if remediations.is_empty() {
            self.out.push(place.clone(), "`runbook.remediations` lists no problem type");
        }
        let escalation = raw.escalation.and_then(|mut fields| {
            if fields.contains_key("name") || fields.contains_key("dependsOn") {
                self.out.push(place.clone(), "`runbook.escalation` takes no `name` or `dependsOn`: it runs last");
            }
            fields.insert(Value::from("name"), Value::from(ESCALATION));
            fields.remove("dependsOn");
            match serde_yaml::from_value::<RawTask>(Value::Mapping(fields)) {
                Ok(raw) => Some(self.task(stage, sequence, raw, None)),
                Err(why) => {
                    self.out.push(place.clone(), format!("`runbook.escalation` is not a task: {why}"));
                    None
                }
            }
        });
        Some(Runbook {
            remediations,
            evaluate_after: raw.evaluate_after.and_then(|v| self.duration(&place, "runbook.evaluateAfter", &v)),
            get_sli: raw.get_sli.unwrap_or(true),
            escalation,
        })
    }

    fn trigger(&mut self, place: &Place, raw: RawTrigger) -> Option<Trigger> {
        self.unknown(&raw.unknown, place.clone(), "triggeredOn");
        let source = raw.event.strip_suffix(".finished").and_then(|rest| rest.split_once('.'));
        let selector = selector(place, &raw.event, raw.selector.as_ref(), self.out);
        match source {
            Some((stage, sequence)) if !stage.is_empty() && !sequence.is_empty() => {
                Some(Trigger { stage: stage.to_string(), sequence: sequence.to_string(), selector: selector? })
            }
            _ => {
                self.out.push(
                    place.clone(),
                    format!("triggeredOn event `{}` is not `<stage>.<sequence>.finished`", raw.event),
                );
                None
            }
        }
    }

    fn task(&mut self, stage: &str, sequence: &str, raw: RawTask, previous: Option<String>) -> Task {
        let place = Place::task(stage, sequence, &raw.name);
        self.unknown(&raw.unknown, place.clone(), "task");
        let depends_on = match raw.depends_on {
            // Keptn sequences are chains; an explicit DAG needs Capstan's format, and ignoring the
            // key silently would run the tasks in an order the author did not write.
            Some(_) if self.keptn => {
                self.out
                    .push(place.clone(), "`dependsOn` needs `apiVersion: capstan.dev/v1`; Keptn sequences are chains");
                previous.into_iter().collect()
            }
            Some(list) => list.into_iter().fold(Vec::new(), |mut all, name| {
                if !all.contains(&name) {
                    all.push(name);
                }
                all
            }),
            None => previous.into_iter().collect(),
        };
        let (retry, timeouts, dispatch) = if self.keptn {
            (RetryPolicy::keptn(), Timeouts::keptn(), DispatchMode::Fanout)
        } else {
            (RetryPolicy::default(), Timeouts::default(), DispatchMode::Auction)
        };
        Task {
            task_type: raw.task_type.unwrap_or_else(|| raw.name.clone()),
            properties: self.properties(&place, raw.properties),
            depends_on,
            retry: self.retry(&place, raw.retry, retry),
            timeouts: self.timeouts(&place, raw.timeouts, timeouts),
            requires: self.requires(&place, raw.requires),
            dispatch: self.dispatch(&place, raw.dispatch.as_ref(), dispatch),
            award: self.award(&place, raw.award.as_ref()),
            continue_on_failure: raw.continue_on_failure.unwrap_or(false),
            idempotent: raw.idempotent.unwrap_or(true),
            claim: raw.claim.unwrap_or(true),
            triggered_after: raw.triggered_after.and_then(|value| self.duration(&place, "triggeredAfter", &value)),
            ends_run_on: Vec::new(),
            name: raw.name,
        }
    }

    fn duration(&mut self, place: &Place, field: &str, value: &Value) -> Option<Millis> {
        let parsed = match scalar_text(value) {
            Some(text) => parse_duration(&text),
            None => Err("expected a duration like 300ms, 10s, 5m, 1h".into()),
        };
        parsed.map_err(|why| self.out.push(place.clone(), format!("`{field}`: {why}"))).ok()
    }

    fn retry(&mut self, place: &Place, raw: Option<RawRetry>, default: RetryPolicy) -> RetryPolicy {
        let Some(raw) = raw else { return default };
        self.unknown(&raw.unknown, place.clone(), "retry");
        let interval = |b: &mut Self, field: &str, value: Option<Value>, default: Millis| {
            value.and_then(|v| b.duration(place, field, &v)).unwrap_or(default)
        };
        RetryPolicy {
            max_attempts: raw.max_attempts.unwrap_or(default.max_attempts),
            initial_interval: interval(self, "retry.initialInterval", raw.initial_interval, default.initial_interval),
            backoff_coefficient: raw.backoff_coefficient.unwrap_or(default.backoff_coefficient),
            max_interval: interval(self, "retry.maxInterval", raw.max_interval, default.max_interval),
            non_retryable: raw.non_retryable.unwrap_or(default.non_retryable),
        }
    }

    fn timeouts(&mut self, place: &Place, raw: Option<RawTimeouts>, default: Timeouts) -> Timeouts {
        let Some(raw) = raw else { return default };
        self.unknown(&raw.unknown, place.clone(), "timeouts");
        let limit = |b: &mut Self, field: &str, value: Option<Value>, default: Option<Millis>| match value {
            Some(v) => b.duration(place, field, &v).or(default),
            None => default,
        };
        Timeouts {
            schedule_to_start: limit(
                self,
                "timeouts.scheduleToStart",
                raw.schedule_to_start,
                default.schedule_to_start,
            ),
            start_to_close: limit(self, "timeouts.startToClose", raw.start_to_close, default.start_to_close),
            heartbeat: limit(self, "timeouts.heartbeat", raw.heartbeat, default.heartbeat),
            bid_window: limit(self, "timeouts.bidWindow", raw.bid_window, Some(default.bid_window))
                .unwrap_or(default.bid_window),
        }
    }

    fn requires(&mut self, place: &Place, raw: Option<RawRequires>) -> BTreeMap<String, String> {
        let Some(raw) = raw else {
            return BTreeMap::new();
        };
        self.unknown(&raw.unknown, place.clone(), "requires");
        let mut labels = BTreeMap::new();
        for (key, value) in raw.labels.unwrap_or_default() {
            match scalar_text(&value) {
                Some(text) => {
                    labels.insert(key, text);
                }
                None => self.out.push(place.clone(), format!("label `{key}` must be a string")),
            }
        }
        labels
    }

    fn properties(&mut self, place: &Place, raw: Option<Value>) -> Map<String, serde_json::Value> {
        let converted = match raw {
            None | Some(Value::Null) => return Map::new(),
            Some(value @ Value::Mapping(_)) => serde_json::to_value(value),
            Some(_) => {
                self.out.push(place.clone(), "`properties` must be a mapping");
                return Map::new();
            }
        };
        match converted {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => Map::new(),
            Err(why) => {
                self.out.push(place.clone(), format!("`properties` cannot be read as JSON: {why}"));
                Map::new()
            }
        }
    }

    fn dispatch(&mut self, place: &Place, raw: Option<&Value>, default: DispatchMode) -> DispatchMode {
        let Some(value) = raw else { return default };
        match scalar_text(value).as_deref() {
            Some("auction") => DispatchMode::Auction,
            Some("queue") => DispatchMode::Queue,
            Some("fanout") => DispatchMode::Fanout,
            other => {
                self.out
                    .push(place.clone(), format!("`dispatch`: {} is not one of auction, queue, fanout", shown(other)));
                default
            }
        }
    }

    fn award(&mut self, place: &Place, raw: Option<&Value>) -> AwardPolicy {
        let Some(value) = raw else {
            return AwardPolicy::default();
        };
        match scalar_text(value).as_deref() {
            Some("first") => AwardPolicy::First,
            Some("lowest-cost") => AwardPolicy::LowestCost,
            Some("earliest-finish") => AwardPolicy::EarliestFinish,
            other => {
                self.out.push(
                    place.clone(),
                    format!("`award`: {} is not one of first, lowest-cost, earliest-finish", shown(other)),
                );
                AwardPolicy::default()
            }
        }
    }
}

/// A scalar as quoted in a message, or a description of a value that is not one.
pub(super) fn shown(text: Option<&str>) -> String {
    text.map_or_else(|| "a list or mapping".to_string(), |t| format!("`{t}`"))
}
