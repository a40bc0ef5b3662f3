//! A short human summary of a definition, as `capstan validate` prints it: stages, sequences with
//! the shape of their DAG, and which sequence triggers which.

use std::fmt::Write;

use super::model::{ConditionSubject, Definition, Flavor, Selector, Sequence};

impl Definition {
    /// Stages, their sequences with task counts and DAG shape, and the promotion edges.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let name = if self.name.is_empty() { "(unnamed)" } else { self.name.as_str() };
        let flavor = match &self.flavor {
            Flavor::Capstan => "capstan.dev/v1".to_string(),
            Flavor::Keptn { version } => {
                format!("{version}: Keptn semantics, chained tasks, fanout dispatch")
            }
        };
        // Writing to a String cannot fail, so the fmt::Results below are ignored on purpose.
        let _ = writeln!(out, "{name} ({flavor})");
        for stage in &self.stages {
            let _ = writeln!(out, "stage {}", stage.name);
            for sequence in &stage.sequences {
                let count = match sequence.tasks.len() {
                    1 => "1 task".to_string(),
                    n => format!("{n} tasks"),
                };
                let _ = writeln!(out, "  {} ({count}): {}", sequence.name, shape(sequence));
            }
        }
        let mut triggers = Vec::new();
        for stage in &self.stages {
            for sequence in &stage.sequences {
                for trigger in &sequence.triggered_on {
                    triggers.push(format!(
                        "  {}.{} --({})--> {}.{}",
                        trigger.stage,
                        trigger.sequence,
                        selector(&trigger.selector),
                        stage.name,
                        sequence.name
                    ));
                }
            }
        }
        if triggers.is_empty() {
            out.push_str("triggers: none\n");
        } else {
            out.push_str("triggers\n");
            for line in triggers {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }
}

/// The DAG as layers by depth: `deploy -> {api-test, ui-test} -> evaluation`. A layer holds the
/// tasks whose longest chain of dependencies has the same length, so a chain prints as a chain.
fn shape(sequence: &Sequence) -> String {
    if sequence.tasks.is_empty() {
        return "(no tasks)".into();
    }
    let tasks = &sequence.tasks;
    let mut depth: Vec<Option<usize>> = vec![None; tasks.len()];
    // Relax until nothing changes; validated definitions are acyclic, so this ends after at most
    // one round per task. Tasks on a cycle (only in hand-built models) keep no depth.
    for _ in 0..tasks.len() {
        let mut changed = false;
        for (at, task) in tasks.iter().enumerate() {
            let deps: Option<Vec<usize>> = task
                .depends_on
                .iter()
                .filter_map(|dep| sequence.task_index(dep))
                .map(|dep| depth[dep].map(|d| d + 1))
                .collect();
            let new = deps.map(|d| d.into_iter().max().unwrap_or(0));
            if new.is_some() && new != depth[at] {
                depth[at] = new;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let layers = depth.iter().flatten().max().map_or(0, |d| d + 1);
    let mut parts: Vec<String> = (0..layers)
        .map(|layer| {
            let names: Vec<&str> =
                tasks.iter().zip(&depth).filter(|(_, d)| **d == Some(layer)).map(|(t, _)| t.name.as_str()).collect();
            group(&names)
        })
        .collect();
    let stuck: Vec<&str> =
        tasks.iter().zip(&depth).filter(|(_, d)| d.is_none()).map(|(t, _)| t.name.as_str()).collect();
    if !stuck.is_empty() {
        parts.push(format!("{} (cycle)", group(&stuck)));
    }
    parts.join(" -> ")
}

fn group(names: &[&str]) -> String {
    match names {
        [one] => (*one).to_string(),
        many => format!("{{{}}}", many.join(", ")),
    }
}

/// `pass|warning` for a condition on the run only; `result=..., <task>.result=...` otherwise.
fn selector(selector: &Selector) -> String {
    let any_of =
        |results: &[super::model::TaskResult]| results.iter().map(|r| r.as_str()).collect::<Vec<_>>().join("|");
    match selector.conditions.as_slice() {
        [] => "pass|warning".into(),
        [only] if only.subject == ConditionSubject::Run => any_of(&only.any_of),
        all => all
            .iter()
            .map(|condition| match &condition.subject {
                ConditionSubject::Run => format!("result={}", any_of(&condition.any_of)),
                ConditionSubject::Task(task) => {
                    format!("{task}.result={}", any_of(&condition.any_of))
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use crate::definition::parse;
    use crate::definition::tests::ARCHITECTURE_EXAMPLE;

    const SOCKSHOP: &str = include_str!("../../tests/fixtures/keptn/shipyard-sockshop.yaml");

    #[test]
    fn summarises_sockshop() {
        let def = parse(SOCKSHOP).expect("sockshop parses");
        expect![[r#"
            shipyard-sockshop (spec.keptn.sh/0.2.0: Keptn semantics, chained tasks, fanout dispatch)
            stage dev
              delivery (4 tasks): deployment -> test -> evaluation -> release
              delivery-direct (2 tasks): deployment -> release
            stage staging
              delivery (4 tasks): deployment -> test -> evaluation -> release
              rollback (1 task): rollback
              delivery-direct (2 tasks): deployment -> release
            stage production
              delivery (2 tasks): deployment -> release
              rollback (1 task): rollback
              delivery-direct (2 tasks): deployment -> release
              remediation (3 tasks): get-action -> action -> evaluation
            triggers
              dev.delivery --(pass|warning)--> staging.delivery
              staging.delivery --(fail)--> staging.rollback
              dev.delivery-direct --(pass|warning)--> staging.delivery-direct
              staging.delivery --(pass|warning)--> production.delivery
              production.delivery --(fail)--> production.rollback
              staging.delivery-direct --(pass|warning)--> production.delivery-direct
              production.remediation --(evaluation.result=fail)--> production.remediation
        "#]]
        .assert_eq(&def.summary());
    }

    #[test]
    fn summarises_architecture_example() {
        let def = parse(ARCHITECTURE_EXAMPLE).expect("example parses");
        expect![[r#"
            checkout (capstan.dev/v1)
            stage dev
              delivery (4 tasks): deploy -> {api-test, ui-test} -> evaluation
            stage production
              delivery (2 tasks): approval -> deploy
            triggers
              dev.delivery --(pass)--> production.delivery
        "#]]
        .assert_eq(&def.summary());
    }

    #[test]
    fn shows_diamonds_and_independent_starts() {
        let def = parse(
            r#"
apiVersion: capstan.dev/v1
kind: Shipyard
spec:
  stages:
    - name: dev
      sequences:
        - name: build
          tasks:
            - {name: lint, dependsOn: []}
            - {name: compile, dependsOn: []}
            - {name: unit, dependsOn: [compile]}
            - {name: package, dependsOn: [lint, unit]}
"#,
        )
        .expect("parses");
        expect![[r#"
            (unnamed) (capstan.dev/v1)
            stage dev
              build (4 tasks): {lint, compile} -> unit -> package
            triggers: none
        "#]]
        .assert_eq(&def.summary());
    }
}
