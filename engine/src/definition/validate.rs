//! Checks between elements of a built definition: names, duplicates, dependencies, cycles,
//! triggers and value ranges. Every problem is recorded; nothing stops at the first.

use std::collections::{BTreeSet, HashMap};

use petgraph::algo::tarjan_scc;
use petgraph::graph::DiGraph;

use super::diagnostic::{Diagnostics, Place};
use super::model::{ConditionSubject, Definition, DispatchMode, Sequence, Task};

/// Records every problem of `def` in `out`.
pub(super) fn check(def: &Definition, out: &mut Diagnostics) {
    let mut stage_names = BTreeSet::new();
    for stage in &def.stages {
        let place = Place::stage(&stage.name);
        if stage.name.is_empty() {
            out.push(place.clone(), "a stage needs a name");
        }
        // `<stage>.<sequence>.finished` is split at the first dot, so a dot in a stage name
        // would make every trigger on it ambiguous.
        if stage.name.contains('.') {
            out.push(place.clone(), "a stage name must not contain `.`");
        }
        if !stage_names.insert(stage.name.as_str()) {
            out.push(place, "duplicate stage name");
        }
        let mut sequence_names = BTreeSet::new();
        for sequence in &stage.sequences {
            let place = Place::sequence(&stage.name, &sequence.name);
            if sequence.name.is_empty() {
                out.push(place.clone(), "a sequence needs a name");
            }
            if !sequence_names.insert(sequence.name.as_str()) {
                out.push(place.clone(), "duplicate sequence name in this stage");
            }
            // Keptn accepts a sequence without tasks (it finishes at once); in Capstan's own
            // format it is almost always a mistake.
            match (&sequence.runbook, sequence.tasks.is_empty()) {
                (Some(_), false) => out.push(place.clone(), "a sequence has either `tasks` or a `runbook`, not both"),
                (None, true) if !def.is_keptn() => out.push(place.clone(), "the sequence has no tasks"),
                _ => {}
            }
            check_tasks(&stage.name, sequence, out);
            check_triggers(def, &place, sequence, out);
        }
    }
}

fn check_tasks(stage: &str, sequence: &Sequence, out: &mut Diagnostics) {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut duplicates = false;
    for (at, task) in sequence.tasks.iter().enumerate() {
        let place = Place::task(stage, &sequence.name, &task.name);
        if task.name.is_empty() {
            out.push(place.clone(), "a task needs a name");
        }
        if index.insert(task.name.as_str(), at).is_some() {
            out.push(place.clone(), "duplicate task name in this sequence");
            duplicates = true;
        }
        check_values(&place, task, out);
    }
    for task in &sequence.tasks {
        for dep in &task.depends_on {
            if !index.contains_key(dep.as_str()) {
                let place = Place::task(stage, &sequence.name, &task.name);
                out.push(place, format!("depends on unknown task `{dep}`"));
            }
        }
    }
    // With two tasks of one name the edges are ambiguous; the duplicate is reported already and
    // a cycle found through it would only confuse.
    if !duplicates {
        check_cycles(stage, sequence, &index, out);
    }
}

fn check_cycles(stage: &str, sequence: &Sequence, index: &HashMap<&str, usize>, out: &mut Diagnostics) {
    let mut graph = DiGraph::<usize, ()>::new();
    let nodes: Vec<_> = (0..sequence.tasks.len()).map(|at| graph.add_node(at)).collect();
    for (at, task) in sequence.tasks.iter().enumerate() {
        for dep in &task.depends_on {
            if let Some(&from) = index.get(dep.as_str()) {
                graph.add_edge(nodes[from], nodes[at], ());
            }
        }
    }
    let place = Place::sequence(stage, &sequence.name);
    // Strongly connected components are reported in reverse topological order; sort them so
    // that the diagnostics follow the file.
    let mut cycles: Vec<Vec<usize>> = tarjan_scc(&graph)
        .into_iter()
        .map(|component| {
            let mut members: Vec<usize> = component.into_iter().map(|n| graph[n]).collect();
            members.sort_unstable();
            members
        })
        .filter(|members| match members.as_slice() {
            [one] => sequence.tasks[*one].depends_on.contains(&sequence.tasks[*one].name),
            _ => true,
        })
        .collect();
    cycles.sort();
    for members in cycles {
        let names: Vec<String> = members.iter().map(|&at| format!("`{}`", sequence.tasks[at].name)).collect();
        let message = match names.as_slice() {
            [one] => format!("task {one} depends on itself"),
            _ => format!("tasks {} depend on each other in a cycle", names.join(", ")),
        };
        out.push(place.clone(), message);
    }
}

fn check_values(place: &Place, task: &Task, out: &mut Diagnostics) {
    let retry = &task.retry;
    if retry.max_attempts == 0 {
        out.push(place.clone(), "`retry.maxAttempts` must be at least 1 (1 means no retry)");
    }
    // NaN (`.nan` in YAML) compares as neither smaller nor larger, so test for the good case.
    let coefficient_ok = retry.backoff_coefficient.is_finite() && retry.backoff_coefficient >= 1.0;
    if !coefficient_ok {
        out.push(
            place.clone(),
            format!("`retry.backoffCoefficient` must be at least 1, not {}", retry.backoff_coefficient),
        );
    }
    if retry.initial_interval > retry.max_interval {
        out.push(
            place.clone(),
            format!(
                "`retry.initialInterval` ({}ms) is longer than `retry.maxInterval` ({}ms)",
                retry.initial_interval, retry.max_interval
            ),
        );
    }
    if !task.claim && task.dispatch != DispatchMode::Queue {
        out.push(place.clone(), "`claim: false` needs `dispatch: queue`: auction and fanout workers must bid or claim");
    }
    if !task.claim && !task.idempotent {
        out.push(
            place.clone(),
            "`claim: false` cannot go with `idempotent: false`: an offer delivered twice may start twice",
        );
    }
    let limits = [
        ("scheduleToStart", task.timeouts.schedule_to_start),
        ("startToClose", task.timeouts.start_to_close),
        ("heartbeat", task.timeouts.heartbeat),
    ];
    for (field, limit) in limits {
        if limit == Some(0) {
            out.push(place.clone(), format!("`timeouts.{field}` must be longer than 0"));
        }
    }
}

fn check_triggers(def: &Definition, place: &Place, sequence: &Sequence, out: &mut Diagnostics) {
    for trigger in &sequence.triggered_on {
        let event = format!("{}.{}.finished", trigger.stage, trigger.sequence);
        if def.stage(&trigger.stage).is_none() {
            out.push(place.clone(), format!("triggeredOn event `{event}` names unknown stage `{}`", trigger.stage));
            continue;
        }
        let Some(source) = def.sequence(&trigger.stage, &trigger.sequence) else {
            out.push(
                place.clone(),
                format!(
                    "triggeredOn event `{event}` names unknown sequence `{}` of stage `{}`",
                    trigger.sequence, trigger.stage
                ),
            );
            continue;
        };
        for condition in &trigger.selector.conditions {
            if let ConditionSubject::Task(task) = &condition.subject
                && source.task(task).is_none()
            {
                out.push(
                    place.clone(),
                    format!(
                        "selector of `{event}` names `{task}.result`, but `{}.{}` has no task `{task}`",
                        trigger.stage, trigger.sequence
                    ),
                );
            }
        }
    }
}
