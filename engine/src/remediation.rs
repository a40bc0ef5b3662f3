//! Keptn `remediation.yaml` runbooks: which ordered actions answer which problem type.
//!
//! The file format is Keptn's `spec.keptn.sh/0.1.4` `Remediation`:
//! `spec.remediations: [{problemType, actionsOnOpen: [{action, name, description, value}]}]`.
//! An action's `value` is free-form (Keptn files use `1`, `"1"` and objects alike), so it is
//! kept as JSON exactly as written and handed to the worker untouched.

use serde::{Deserialize, Serialize};

/// A parsed remediation runbook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Remediation {
    /// `apiVersion`, e.g. `spec.keptn.sh/0.1.4`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Always `Remediation`.
    pub kind: String,
    /// `metadata`, with the runbook's name.
    #[serde(default)]
    pub metadata: Metadata,
    /// `spec`: the problem types and their actions.
    pub spec: RemediationSpec,
}

/// `metadata` of a runbook.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The runbook's name.
    #[serde(default)]
    pub name: String,
}

/// `spec` of a runbook.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RemediationSpec {
    /// The problem types in file order; the first one that matches wins.
    #[serde(default)]
    pub remediations: Vec<ProblemRemediation>,
}

/// The actions for one problem type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemRemediation {
    /// The problem type (a root cause or a problem title); `*` or `default` is the fallback.
    #[serde(rename = "problemType")]
    pub problem_type: String,
    /// The actions, tried in order until the SLOs pass.
    #[serde(rename = "actionsOnOpen", default)]
    pub actions_on_open: Vec<Action>,
}

/// One remediation action, performed by the worker that handles its `action` type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// The action type workers subscribe to, e.g. `scaling`.
    pub action: String,
    /// A name for people.
    #[serde(default)]
    pub name: String,
    /// What the action does.
    #[serde(default)]
    pub description: String,
    /// The action's argument as written: a string, a number or an object.
    #[serde(default)]
    pub value: Option<serde_json::Value>,
}

/// Why a remediation file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RemediationError {
    /// Not YAML, or not the shape of a remediation.yaml; the message carries line and column.
    #[error("remediation.yaml is not valid: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// Well-formed YAML with invalid content; every problem is listed with its location.
    #[error("remediation.yaml has {} problem(s): {}", .0.len(), .0.join("; "))]
    Invalid(Vec<String>),
}

/// The problem types that match any problem when nothing more specific does.
const FALLBACKS: [&str; 2] = ["*", "default"];

/// The problems of a list of problem types, each located under `within`.
pub fn problems(remediations: &[ProblemRemediation], within: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, r) in remediations.iter().enumerate() {
        let at = format!("{within}[{i}]");
        if r.problem_type.trim().is_empty() {
            problems.push(format!("{at}.problemType: must not be empty"));
        }
        for (j, action) in r.actions_on_open.iter().enumerate() {
            if action.action.trim().is_empty() {
                problems.push(format!("{at}.actionsOnOpen[{j}].action: must not be empty ({})", r.problem_type));
            }
        }
    }
    problems
}

/// The actions for a problem among `remediations`: those of the root cause if it is listed,
/// else those of the problem title, else those of the `*` or `default` entry; empty when nothing
/// matches. Matching is exact, and the first matching entry in file order wins.
pub fn actions_for<'a>(
    remediations: &'a [ProblemRemediation],
    root_cause: Option<&str>,
    problem_title: &str,
) -> &'a [Action] {
    let find = |wanted: &str| remediations.iter().find(|r| r.problem_type == wanted);
    root_cause
        .and_then(find)
        .or_else(|| find(problem_title))
        .or_else(|| remediations.iter().find(|r| FALLBACKS.contains(&r.problem_type.as_str())))
        .map_or(&[], |r| r.actions_on_open.as_slice())
}

impl Remediation {
    /// Parses a `remediation.yaml`, reporting every problem with its location.
    pub fn parse(text: &str) -> Result<Remediation, RemediationError> {
        let remediation: Remediation = serde_yaml::from_str(text)?;
        let mut problems = Vec::new();
        if remediation.kind != "Remediation" {
            problems.push(format!("kind: `{}` is not Remediation", remediation.kind));
        }
        problems.extend(self::problems(&remediation.spec.remediations, "spec.remediations"));
        if problems.is_empty() { Ok(remediation) } else { Err(RemediationError::Invalid(problems)) }
    }

    /// The actions for a problem: those of the root cause if it is listed, else those of the
    /// problem title, else those of the `*` or `default` entry; empty when nothing matches.
    /// Matching is exact, and the first matching entry in file order wins.
    pub fn actions_for(&self, root_cause: Option<&str>, problem_title: &str) -> &[Action] {
        actions_for(&self.spec.remediations, root_cause, problem_title)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const FIXTURE: &str = include_str!("../tests/fixtures/keptn/remediation.yaml");

    #[test]
    fn reads_the_keptn_fixture() {
        let r = Remediation::parse(FIXTURE).unwrap();
        assert_eq!(r.api_version, "spec.keptn.sh/0.1.4");
        assert_eq!(r.metadata.name, "carts-remediation");
        assert_eq!(r.spec.remediations.len(), 2);
        let by_title = r.actions_for(None, "Response time degradation");
        assert_eq!(by_title.len(), 1);
        assert_eq!(by_title[0].action, "scaling");
        assert_eq!(by_title[0].description, "Scale up");
        // The same digit, once a number and once a string: both are kept as written.
        assert_eq!(by_title[0].value, Some(json!(1)));
        let by_cause = r.actions_for(Some("response_time_p90"), "Response time degradation");
        assert_eq!(by_cause[0].value, Some(json!("1")));
        assert!(r.actions_for(Some("cpu"), "Memory leak").is_empty());
    }

    const RUNBOOK: &str = r#"
apiVersion: spec.keptn.sh/0.1.4
kind: Remediation
metadata: {name: runbook}
spec:
  remediations:
    - problemType: Failure rate increase
      actionsOnOpen:
        - {action: toggle-feature, name: flag, value: {EnablePromotion: "off"}}
        - {action: scaling, value: 2}
    - problemType: Failure rate increase
      actionsOnOpen: [{action: never-used}]
    - problemType: "*"
      actionsOnOpen: [{action: escalate}]
    - problemType: default
      actionsOnOpen: [{action: shadowed}]
"#;

    #[test]
    fn matches_root_cause_then_title_then_fallback() {
        let r = Remediation::parse(RUNBOOK).unwrap();
        let names = |actions: &[Action]| actions.iter().map(|a| a.action.clone()).collect::<Vec<_>>();
        let cases = [
            (Some("Failure rate increase"), "anything", vec!["toggle-feature", "scaling"]),
            (Some("unknown cause"), "Failure rate increase", vec!["toggle-feature", "scaling"]),
            (None, "Failure rate increase", vec!["toggle-feature", "scaling"]),
            (Some("unknown cause"), "unknown title", vec!["escalate"]),
            (None, "", vec!["escalate"]),
        ];
        for (cause, title, expected) in cases {
            assert_eq!(names(r.actions_for(cause, title)), expected, "{cause:?} / {title}");
        }
        let object = &r.actions_for(None, "Failure rate increase")[0];
        assert_eq!(object.value, Some(json!({"EnablePromotion": "off"})));
        assert_eq!(r.actions_for(None, "Failure rate increase")[1].name, "");

        let default_only = RUNBOOK.replace("\"*\"", "default-not");
        let r = Remediation::parse(&default_only).unwrap();
        assert_eq!(names(r.actions_for(None, "x")), ["shadowed"]);
    }

    #[test]
    fn rejects_bad_runbooks_with_locations() {
        let text = "apiVersion: spec.keptn.sh/0.1.4\nkind: Shipyard\nspec:\n  remediations:\n    - problemType: ''\n      actionsOnOpen: [{action: ''}]\n";
        match Remediation::parse(text) {
            Err(RemediationError::Invalid(problems)) => assert_eq!(
                problems,
                [
                    "kind: `Shipyard` is not Remediation",
                    "spec.remediations[0].problemType: must not be empty",
                    "spec.remediations[0].actionsOnOpen[0].action: must not be empty ()",
                ]
            ),
            other => panic!("expected problems, got {other:?}"),
        }
        let err = Remediation::parse("kind: Remediation\nspec: []\n").unwrap_err();
        assert!(matches!(err, RemediationError::Yaml(_)), "{err}");
    }
}
