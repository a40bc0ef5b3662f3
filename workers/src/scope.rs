//! What a task is about (project, stage, service), files configured per scope (sli.yaml,
//! slo.yaml), and the duration properties the delivery workers share.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::handler::TaskContext;

/// The project, stage and service a task works on, read from its input (Keptn's event data
/// carries them as `project`, `stage`, `service`); the project falls back to the award's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scope {
    /// The project.
    pub project: String,
    /// The stage, if the input names one.
    pub stage: Option<String>,
    /// The service, if the input names one.
    pub service: Option<String>,
}

impl Scope {
    /// The scope of a task: the run's own stage and service when the worker saw the offer
    /// (a promoted run's input still names the stage it was promoted from), else the input's.
    pub fn of(task: &TaskContext) -> Self {
        let text = |key: &str| task.input().get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
        let place = task.place();
        Scope {
            project: text("project").map_or_else(|| task.award().attempt.project.clone(), str::to_string),
            stage: place.map(|p| p.stage.clone()).or_else(|| text("stage").map(str::to_string)),
            service: place.and_then(|p| p.service.clone()).or_else(|| text("service").map(str::to_string)),
        }
    }
}

/// Files configured per scope. Keys are `project`, `project/stage` or
/// `project/stage/service`; the most specific key that matches a task wins, so a project-wide
/// file can be overridden for one stage or one service.
#[derive(Debug, Clone, Default)]
pub struct ScopedFiles {
    files: BTreeMap<String, PathBuf>,
}

impl ScopedFiles {
    /// No files.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a file for a key (`project`, `project/stage` or `project/stage/service`).
    pub fn with(mut self, key: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.files.insert(key.into(), path.into());
        self
    }

    /// The most specific file configured for `scope`, with the key that matched.
    pub fn find(&self, scope: &Scope) -> Option<(&str, &PathBuf)> {
        let p = &scope.project;
        let mut keys = Vec::with_capacity(3);
        if let Some(stage) = &scope.stage {
            if let Some(service) = &scope.service {
                keys.push(format!("{p}/{stage}/{service}"));
            }
            keys.push(format!("{p}/{stage}"));
        }
        keys.push(p.clone());
        keys.iter().find_map(|k| self.files.get_key_value(k.as_str())).map(|(k, v)| (k.as_str(), v))
    }

    /// Reads the file for `scope`; `Ok(None)` when none is configured.
    pub async fn read(&self, scope: &Scope) -> Result<Option<String>, String> {
        let Some((key, path)) = self.find(scope) else {
            return Ok(None);
        };
        tokio::fs::read_to_string(path)
            .await
            .map(Some)
            .map_err(|e| format!("could not read {} (configured for {key}): {e}", path.display()))
    }
}

/// A duration property: `"300ms"`, `"10s"`, `"5m"`, `"1h"`, or a number of seconds.
pub fn duration_property(name: &str, v: &Value) -> Result<Duration, String> {
    if let Some(secs) = v.as_f64() {
        return if secs >= 0.0 && secs.is_finite() {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(format!("{name}: {secs} is not a duration"))
        };
    }
    let text = v.as_str().ok_or_else(|| format!("{name}: must be a duration like \"30s\" or a number of seconds"))?;
    capstan_engine::parse_duration(text.trim()).map(Duration::from_millis).map_err(|e| format!("{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope(stage: Option<&str>, service: Option<&str>) -> Scope {
        Scope { project: "sockshop".into(), stage: stage.map(Into::into), service: service.map(Into::into) }
    }

    #[test]
    fn the_most_specific_file_wins() {
        let files = ScopedFiles::new()
            .with("sockshop", "/p.yaml")
            .with("sockshop/production", "/ps.yaml")
            .with("sockshop/production/carts", "/psc.yaml");
        let find = |s: &Scope| files.find(s).map(|(k, _)| k.to_string());
        assert_eq!(find(&scope(Some("production"), Some("carts"))).as_deref(), Some("sockshop/production/carts"));
        assert_eq!(find(&scope(Some("production"), Some("orders"))).as_deref(), Some("sockshop/production"));
        assert_eq!(find(&scope(Some("dev"), Some("carts"))).as_deref(), Some("sockshop"));
        assert_eq!(find(&scope(None, Some("carts"))).as_deref(), Some("sockshop"));
        assert_eq!(files.find(&Scope { project: "other".into(), ..Scope::default() }), None);
    }

    #[test]
    fn the_runs_own_stage_wins_over_the_carried_input() {
        // A run promoted from dev to staging still carries `stage: dev` in its data.
        let task = crate::test_server::task("evaluation", json!({"stage": "dev", "service": "carts"}));
        assert_eq!(Scope::of(&task), scope(Some("dev"), Some("carts")));
        let place = crate::RunPlace {
            stage: "staging".into(),
            sequence: "delivery".into(),
            service: Some("carts".into()),
            context_id: "c".into(),
        };
        assert_eq!(Scope::of(&task.with_place(Some(place))), scope(Some("staging"), Some("carts")));
    }

    #[test]
    fn durations_are_strings_or_seconds() {
        assert_eq!(duration_property("t", &json!("5m")), Ok(Duration::from_secs(300)));
        assert_eq!(duration_property("t", &json!(1.5)), Ok(Duration::from_millis(1500)));
        assert!(duration_property("t", &json!("soon")).unwrap_err().starts_with("t: "));
        assert!(duration_property("t", &json!(-1)).is_err());
        assert!(duration_property("t", &json!([])).is_err());
    }
}
