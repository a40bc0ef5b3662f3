//! The definition `capstan bench` applies: one stage, one sequence of K no-op tasks in a chain or
//! a fan-out, all of one task type that the bench's echo workers take.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The task type every bench task has; the bench's workers subscribe to it alone.
pub const TASK_TYPE: &str = "bench-echo";
/// The stage and sequence the bench triggers.
pub const STAGE: &str = "bench";
pub const SEQUENCE: &str = "run";

/// How the tasks depend on each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// t1 -> t2 -> ... -> tK: every step waits for the one before (Keptn's sequences).
    Chain,
    /// start -> K-2 parallel tasks -> join.
    Fanout,
}

/// How tasks reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dispatch {
    /// Competing consumers: the first claim wins.
    Queue,
    /// Competing consumers without claims (`claim: false`): the offer carries its token, the
    /// member that receives it runs it, and its first report binds the attempt.
    ClaimFree,
    /// Offer to every worker, award the first acceptable bid (`award: first`).
    Auction,
}

impl Dispatch {
    /// The task's dispatch keys in the definition.
    fn keys(self) -> &'static str {
        match self {
            Dispatch::Queue => "dispatch: queue",
            Dispatch::ClaimFree => "dispatch: queue, claim: false",
            Dispatch::Auction => "dispatch: auction",
        }
    }
}

/// The generated sequence: its YAML and, per task, the tasks it waits for.
#[derive(Debug, Clone)]
pub struct BenchShipyard {
    pub yaml: String,
    pub depends_on: BTreeMap<String, Vec<String>>,
}

/// Why a shape cannot be built with that many tasks.
pub fn check(shape: Shape, tasks: usize) -> Result<(), String> {
    match shape {
        Shape::Chain if tasks < 1 => Err("--tasks must be at least 1 for a chain".into()),
        Shape::Fanout if tasks < 3 => Err("--tasks must be at least 3 for a fanout (start, parallel, join)".into()),
        _ => Ok(()),
    }
}

/// Builds the definition; `check` must have passed.
pub fn generate(shape: Shape, tasks: usize, dispatch: Dispatch) -> BenchShipyard {
    let mut depends_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut order = Vec::with_capacity(tasks);
    match shape {
        Shape::Chain => {
            for i in 1..=tasks {
                let name = format!("t{i}");
                let deps = if i == 1 { vec![] } else { vec![format!("t{}", i - 1)] };
                depends_on.insert(name.clone(), deps);
                order.push(name);
            }
        }
        Shape::Fanout => {
            depends_on.insert("start".into(), vec![]);
            order.push("start".to_string());
            let parallel: Vec<String> = (1..=tasks - 2).map(|i| format!("p{i}")).collect();
            for p in &parallel {
                depends_on.insert(p.clone(), vec!["start".into()]);
                order.push(p.clone());
            }
            depends_on.insert("join".into(), parallel);
            order.push("join".to_string());
        }
    }
    let mut yaml = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        yaml,
        "apiVersion: capstan.dev/v1\nkind: Shipyard\nmetadata: {{name: bench}}\nspec:\n  stages:\n    \
         - name: {STAGE}\n      sequences:\n        - name: {SEQUENCE}\n          tasks:\n"
    );
    for name in &order {
        // Every dependency is spelled out, so the YAML means the same in any task order.
        let deps = depends_on[name].join(", ");
        let _ = writeln!(
            yaml,
            "            - {{name: {name}, type: {TASK_TYPE}, {}, award: first, dependsOn: [{deps}]}}",
            dispatch.keys()
        );
    }
    BenchShipyard { yaml, depends_on }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_definitions_are_valid_and_have_the_asked_shape() {
        for (shape, k) in [(Shape::Chain, 1), (Shape::Chain, 5), (Shape::Fanout, 3), (Shape::Fanout, 10)] {
            for dispatch in [Dispatch::Queue, Dispatch::ClaimFree, Dispatch::Auction] {
                let b = generate(shape, k, dispatch);
                let def = capstan_engine::parse(&b.yaml).unwrap_or_else(|e| panic!("{shape:?} {k}: {e:?}\n{}", b.yaml));
                let seq = &def.stages[0].sequences[0];
                assert_eq!(seq.tasks.len(), k);
                for t in &seq.tasks {
                    assert_eq!(t.depends_on, b.depends_on[&t.name], "{}", b.yaml);
                    assert_eq!(t.claim, dispatch != Dispatch::ClaimFree, "{}", b.yaml);
                }
            }
        }
        let fan = generate(Shape::Fanout, 5, Dispatch::Queue);
        assert_eq!(fan.depends_on["join"], ["p1", "p2", "p3"]);
    }

    #[test]
    fn too_few_tasks_are_refused() {
        assert!(check(Shape::Chain, 0).is_err());
        assert!(check(Shape::Fanout, 2).is_err());
        assert!(check(Shape::Fanout, 3).is_ok());
    }
}
