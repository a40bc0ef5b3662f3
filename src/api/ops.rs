//! The API's operations, shared by the gRPC and HTTP front ends: each checks access first (the
//! project a run belongs to comes from the run index, never from the caller), validates its
//! input with the field named, and only then calls the runtime.

use std::collections::BTreeMap;

use capstan_engine::run::Input;
use capstan_engine::slo;
use capstan_store::{DefinitionRecord, RunFilter, RunRecord, StoredEvent};
use serde_json::Value;

use super::auth::{Auth, Caller, Role};
use super::error::ApiError;
use crate::config::Limits;
use crate::runtime::{Applied, RuntimeHandle, TriggerRequest};

/// Default and largest page of `List`.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 1000;

/// What the API serves from: the runtime, the access policy and the limits.
#[derive(Clone)]
pub struct Api {
    /// The running engine.
    pub runtime: RuntimeHandle,
    /// Who may do what.
    pub auth: Auth,
    /// Size limits.
    pub limits: Limits,
}

/// A definition check's outcome.
#[derive(Debug, Clone)]
pub struct Validation {
    /// The definition's name, when it parsed far enough to have one.
    pub name: String,
    /// Every problem with its place; empty when valid.
    pub problems: Vec<String>,
    /// For a valid definition: its stages, sequences and DAGs.
    pub summary: String,
}

/// Filters of `List` as the caller gave them (empty strings mean "any").
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// The project (required when auth is on).
    pub project: String,
    /// Only this stage.
    pub stage: String,
    /// Only this sequence.
    pub sequence: String,
    /// Only this service.
    pub service: String,
    /// Only this status.
    pub status: String,
    /// Only this promotion chain.
    pub context_id: String,
    /// Page size (0: default).
    pub page_size: usize,
    /// From the previous page.
    pub page_token: String,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn require(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() { Err(ApiError::missing(field)) } else { Ok(()) }
}

impl Api {
    /// Stores a definition (admin).
    pub async fn apply(&self, token: Option<&str>, project: &str, source: &str) -> Result<(String, i64), ApiError> {
        require("project", project)?;
        self.auth.authorize(token, project, Role::Admin)?;
        require("source", source)?;
        if source.len() > self.limits.max_body_bytes() {
            return Err(ApiError::TooLarge(format!(
                "definition is {} bytes, more than the limit of {}",
                source.len(),
                self.limits.max_body_bytes()
            )));
        }
        Ok(self.runtime.apply_definition(project, source).await?)
    }

    /// One definition version; `name` empty means the project's only definition, version 0 the latest.
    pub async fn get_definition(
        &self,
        token: Option<&str>,
        project: &str,
        name: &str,
        version: i64,
    ) -> Result<DefinitionRecord, ApiError> {
        require("project", project)?;
        self.auth.authorize(token, project, Role::Viewer)?;
        if version < 0 {
            return Err(ApiError::invalid("version", "must be 0 (latest) or a version number"));
        }
        let store = self.runtime.store();
        let name = match non_empty(name) {
            Some(n) => n,
            None => {
                let all = store.list_definitions(project).await?;
                match all.as_slice() {
                    [one] => one.name.clone(),
                    [] => return Err(ApiError::NotFound(format!("project `{project}` has no definition"))),
                    _ => {
                        return Err(ApiError::invalid(
                            "name",
                            format!("project `{project}` has {} definitions; name one", all.len()),
                        ));
                    }
                }
            }
        };
        let wanted = (version > 0).then_some(version);
        store.get_definition(project, &name, wanted).await?.ok_or_else(|| match wanted {
            Some(v) => ApiError::NotFound(format!("definition `{name}` v{v} in project `{project}` not found")),
            None => ApiError::NotFound(format!("definition `{name}` in project `{project}` not found")),
        })
    }

    /// Every version of a definition, oldest first.
    pub async fn list_versions(
        &self,
        token: Option<&str>,
        project: &str,
        name: &str,
    ) -> Result<Vec<DefinitionRecord>, ApiError> {
        let latest = self.get_definition(token, project, name, 0).await?;
        let mut versions = Vec::new();
        for v in 1..=latest.version {
            if let Some(d) = self.runtime.store().get_definition(project, &latest.name, Some(v)).await? {
                versions.push(d);
            }
        }
        Ok(versions)
    }

    /// Checks a definition without storing it (any authenticated caller).
    pub fn validate(&self, token: Option<&str>, source: &str) -> Result<Validation, ApiError> {
        self.auth.authenticate(token)?;
        Ok(match capstan_engine::definition::parse(source) {
            Ok(d) => Validation { name: d.name.clone(), problems: Vec::new(), summary: d.summary() },
            Err(diagnostics) => Validation {
                name: String::new(),
                problems: diagnostics.iter().map(ToString::to_string).collect(),
                summary: String::new(),
            },
        })
    }

    /// Starts a sequence (operator).
    pub async fn trigger(&self, token: Option<&str>, req: TriggerRequest) -> Result<String, ApiError> {
        Ok(self.trigger_once(token, req).await?.0)
    }

    /// [`trigger`](Self::trigger), also telling whether this call started the run (`false`: its
    /// request id had started it before).
    pub async fn trigger_once(&self, token: Option<&str>, req: TriggerRequest) -> Result<(String, bool), ApiError> {
        require("project", &req.project)?;
        self.auth.authorize(token, &req.project, Role::Operator)?;
        require("stage", &req.stage)?;
        require("sequence", &req.sequence)?;
        if !(req.data.is_object() || req.data.is_null()) {
            return Err(ApiError::invalid("data", "must be a JSON object"));
        }
        self.check_payload("data", &req.data)?;
        Ok(self.runtime.trigger_once(req).await?)
    }

    /// Refuses data over the configured limit.
    pub fn check_payload(&self, field: &str, data: &Value) -> Result<(), ApiError> {
        let size = serde_json::to_vec(data).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > self.limits.max_payload_bytes {
            return Err(ApiError::TooLarge(format!(
                "{field} is {size} bytes, more than the limit of {} bytes",
                self.limits.max_payload_bytes
            )));
        }
        Ok(())
    }

    /// A run's record, after checking the caller may act on it with `role`. A `project` the caller
    /// named must be the run's own.
    pub async fn run(
        &self,
        token: Option<&str>,
        project: &str,
        run_id: &str,
        role: Role,
    ) -> Result<(RunRecord, Caller), ApiError> {
        require("run_id", run_id)?;
        // Authenticate before looking anything up, so unknown callers learn nothing about run ids.
        self.auth.authenticate(token)?;
        let record = self
            .runtime
            .store()
            .get_run(run_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("run {run_id} not found")))?;
        let caller = self.auth.authorize(token, &record.project, role)?;
        if !project.is_empty() && project != record.project {
            return Err(ApiError::NotFound(format!("run {run_id} not found in project `{project}`")));
        }
        Ok((record, caller))
    }

    /// A run's events with `seq >= from_seq`.
    pub async fn events(&self, run_id: &str, from_seq: i64) -> Result<Vec<StoredEvent>, ApiError> {
        Ok(self.runtime.store().read_stream(run_id, from_seq.max(1)).await?)
    }

    /// Runs matching the query, newest first, and the token of the next page.
    pub async fn list(&self, token: Option<&str>, q: &ListQuery) -> Result<(Vec<RunRecord>, String), ApiError> {
        if q.project.is_empty() {
            if self.auth.enabled() {
                return Err(ApiError::invalid("project", "is required (every call names its project)"));
            }
        } else {
            self.auth.authorize(token, &q.project, Role::Viewer)?;
        }
        let page = match q.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let before = match q.page_token.as_str() {
            "" => None,
            t => Some(decode_page_token(t)?),
        };
        let filter = RunFilter {
            project: non_empty(&q.project),
            stage: non_empty(&q.stage),
            sequence: non_empty(&q.sequence),
            service: non_empty(&q.service),
            status: non_empty(&q.status),
            context_id: non_empty(&q.context_id),
            before,
            limit: page + 1,
        };
        let mut runs = self.runtime.store().list_runs(&filter).await?;
        let next = if runs.len() > page {
            runs.truncate(page);
            runs.last().map(|r| encode_page_token(r.created_at_ms, &r.run_id)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((runs, next))
    }

    /// Sends a command to a run (operator).
    pub async fn command(
        &self,
        token: Option<&str>,
        project: &str,
        run_id: &str,
        input: Input,
    ) -> Result<Applied, ApiError> {
        let (record, _) = self.run(token, project, run_id, Role::Operator).await?;
        Ok(self.runtime.command(&record.project, run_id, input).await?)
    }

    /// Approves or rejects a waiting approval task (operator); the caller's name is recorded.
    pub async fn approve(
        &self,
        token: Option<&str>,
        project: &str,
        run_id: &str,
        task: &str,
        approved: bool,
    ) -> Result<Applied, ApiError> {
        require("task", task)?;
        let (record, caller) = self.run(token, project, run_id, Role::Operator).await?;
        let input = Input::Approve { task: task.to_string(), approved, by: caller.name().to_string() };
        Ok(self.runtime.command(&record.project, run_id, input).await?)
    }

    /// Scores SLI values against an slo.yaml (any authenticated caller; nothing is stored).
    pub fn evaluate(
        &self,
        token: Option<&str>,
        slo_yaml: &str,
        values: &BTreeMap<String, f64>,
        previous: &[slo::PreviousResult],
    ) -> Result<slo::Evaluation, ApiError> {
        self.auth.authenticate(token)?;
        require("slo_yaml", slo_yaml)?;
        let file = slo::parse(slo_yaml).map_err(|e| ApiError::invalid("slo_yaml", e.to_string()))?;
        Ok(slo::evaluate(&file, values, previous))
    }
}

/// Page tokens are opaque to clients: hex of `created_at_ms/run_id` of the page's last row.
fn encode_page_token(created_at_ms: i64, run_id: &str) -> String {
    hex::encode(format!("{created_at_ms}/{run_id}"))
}

fn decode_page_token(token: &str) -> Result<(i64, String), ApiError> {
    let bad = || ApiError::invalid("page_token", "is not a token this server handed out");
    let bytes = hex::decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ms, run) = text.split_once('/').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, run.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_garbage() {
        let t = encode_page_token(1234, "run-1");
        assert_eq!(decode_page_token(&t).unwrap(), (1234, "run-1".to_string()));
        assert!(
            matches!(decode_page_token("zz"), Err(ApiError::InvalidArgument { field, .. }) if field == "page_token")
        );
    }
}
