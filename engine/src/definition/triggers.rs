//! Promotion: which sequences start when a run of a sequence finishes (`triggeredOn` + selector).

use super::model::{Condition, ConditionSubject, Definition, Selector, Sequence, Stage, TaskResult};

impl Definition {
    /// Every sequence, in file order, whose `triggeredOn` names `<stage>.<sequence>.finished` and
    /// whose selector matches the finished run: its overall `run_result` and, through
    /// `task_results`, the result of each of its tasks (`None`: the task has no result).
    pub fn followers(
        &self,
        stage: &str,
        sequence: &str,
        run_result: TaskResult,
        task_results: &dyn Fn(&str) -> Option<TaskResult>,
    ) -> Vec<(&Stage, &Sequence)> {
        let mut found = Vec::new();
        for follower_stage in &self.stages {
            for follower in &follower_stage.sequences {
                // A sequence listed twice for the same event starts once.
                let fires = follower.triggered_on.iter().any(|trigger| {
                    trigger.stage == stage
                        && trigger.sequence == sequence
                        && trigger.selector.matches(run_result, task_results)
                });
                if fires {
                    found.push((follower_stage, follower));
                }
            }
        }
        found
    }
}

impl Selector {
    /// Whether a finished run satisfies every condition. With no condition, Keptn's rule applies
    /// to both flavors: the run must have passed or ended with a warning.
    pub fn matches(&self, run_result: TaskResult, task_results: &dyn Fn(&str) -> Option<TaskResult>) -> bool {
        if self.conditions.is_empty() {
            return matches!(run_result, TaskResult::Pass | TaskResult::Warning);
        }
        self.conditions.iter().all(|condition| condition.matches(run_result, task_results))
    }
}

impl Condition {
    /// Whether the run (or the named task) ended with one of the listed results.
    pub fn matches(&self, run_result: TaskResult, task_results: &dyn Fn(&str) -> Option<TaskResult>) -> bool {
        let actual = match &self.subject {
            ConditionSubject::Run => Some(run_result),
            ConditionSubject::Task(task) => task_results(task),
        };
        actual.is_some_and(|result| self.any_of.contains(&result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::parse;

    const SOCKSHOP: &str = include_str!("../../tests/fixtures/keptn/shipyard-sockshop.yaml");

    fn names(found: Vec<(&Stage, &Sequence)>) -> Vec<String> {
        found.into_iter().map(|(stage, seq)| format!("{}.{}", stage.name, seq.name)).collect()
    }

    fn no_tasks(_: &str) -> Option<TaskResult> {
        None
    }

    #[test]
    fn sockshop_staging_delivery_promotes_or_rolls_back() {
        let def = parse(SOCKSHOP).expect("sockshop parses");
        let fail = def.followers("staging", "delivery", TaskResult::Fail, &no_tasks);
        assert_eq!(names(fail), ["staging.rollback"]);
        let pass = def.followers("staging", "delivery", TaskResult::Pass, &no_tasks);
        assert_eq!(names(pass), ["production.delivery"]);
        let warning = def.followers("staging", "delivery", TaskResult::Warning, &no_tasks);
        assert_eq!(names(warning), ["production.delivery"]);
    }

    #[test]
    fn sockshop_remediation_repeats_while_evaluation_fails() {
        let def = parse(SOCKSHOP).expect("sockshop parses");
        let evaluation = |result| move |task: &str| (task == "evaluation").then_some(result);
        let failing = evaluation(TaskResult::Fail);
        let again = def.followers("production", "remediation", TaskResult::Fail, &failing);
        assert_eq!(names(again), ["production.remediation"]);
        // The run result does not matter to a `<task>.result` selector, only the task's.
        let again = def.followers("production", "remediation", TaskResult::Pass, &failing);
        assert_eq!(names(again), ["production.remediation"]);
        let passing = evaluation(TaskResult::Pass);
        assert!(def.followers("production", "remediation", TaskResult::Fail, &passing).is_empty());
        // A task without a result never matches.
        assert!(def.followers("production", "remediation", TaskResult::Fail, &no_tasks).is_empty());
    }

    #[test]
    fn unknown_source_has_no_followers() {
        let def = parse(SOCKSHOP).expect("sockshop parses");
        assert!(def.followers("nowhere", "delivery", TaskResult::Pass, &no_tasks).is_empty());
        assert!(def.followers("production", "delivery-direct", TaskResult::Pass, &no_tasks).is_empty());
    }

    #[test]
    fn all_conditions_must_hold_and_lists_mean_any_of() {
        let def = parse(
            r#"
apiVersion: capstan.dev/v1
kind: Shipyard
spec:
  stages:
    - name: dev
      sequences:
        - name: delivery
          tasks: [{name: test}, {name: evaluation}]
    - name: prod
      sequences:
        - name: careful
          triggeredOn:
            - event: dev.delivery.finished
              selector: {match: {result: [pass, warning], test.result: pass}}
          tasks: [{name: deploy}]
        - name: twice
          triggeredOn:
            - event: dev.delivery.finished
            - event: dev.delivery.finished
              selector: {match: {result: failed}}
          tasks: [{name: deploy}]
"#,
        )
        .expect("parses");
        let test = |result| move |task: &str| (task == "test").then_some(result);
        let run = |run, task| names(def.followers("dev", "delivery", run, &test(task)));
        assert_eq!(run(TaskResult::Warning, TaskResult::Pass), ["prod.careful", "prod.twice"]);
        assert_eq!(run(TaskResult::Warning, TaskResult::Warning), ["prod.twice"]);
        assert_eq!(run(TaskResult::Fail, TaskResult::Pass), ["prod.twice"]);
    }
}
