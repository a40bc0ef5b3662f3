//! Diagnostics: every problem found in a definition, each with the place it was found.

use std::fmt;

/// Where a problem is: a position in the text (YAML syntax and type errors) or a named element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A 1-based line and column, as serde_yaml reports them.
    Text { line: usize, column: usize },
    /// The file as a whole (its header: `apiVersion`, `kind`, `spec`).
    Document,
    /// A stage.
    Stage { stage: String },
    /// A sequence of a stage.
    Sequence { stage: String, sequence: String },
    /// A task of a sequence.
    Task { stage: String, sequence: String, task: String },
}

impl Place {
    /// The place of the named stage.
    pub fn stage(stage: &str) -> Place {
        Place::Stage { stage: stage.to_string() }
    }

    /// The place of the named sequence of a stage.
    pub fn sequence(stage: &str, sequence: &str) -> Place {
        Place::Sequence { stage: stage.to_string(), sequence: sequence.to_string() }
    }

    /// The place of the named task of a sequence.
    pub fn task(stage: &str, sequence: &str, task: &str) -> Place {
        Place::Task { stage: stage.to_string(), sequence: sequence.to_string(), task: task.to_string() }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names are written with `{:?}` so that empty names or names with odd characters stay
        // visible in the message.
        match self {
            Place::Text { line, column } => write!(f, "line {line}, column {column}"),
            Place::Document => f.write_str("document"),
            Place::Stage { stage } => write!(f, "stage {stage:?}"),
            Place::Sequence { stage, sequence } => {
                write!(f, "stage {stage:?} / sequence {sequence:?}")
            }
            Place::Task { stage, sequence, task } => {
                write!(f, "stage {stage:?} / sequence {sequence:?} / task {task:?}")
            }
        }
    }
}

/// One problem of a definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{place}: {message}")]
pub struct Diagnostic {
    /// Where the problem is.
    pub place: Place,
    /// What is wrong, in one sentence.
    pub message: String,
}

impl Diagnostic {
    /// A problem at `place`.
    pub fn new(place: Place, message: impl Into<String>) -> Diagnostic {
        Diagnostic { place, message: message.into() }
    }

    /// A YAML syntax or type error, placed at its line and column when serde_yaml knows them.
    pub fn from_yaml(error: &serde_yaml::Error) -> Diagnostic {
        let text = error.to_string();
        match error.location() {
            Some(at) => {
                // serde_yaml writes the position into its message; the place already says it.
                let suffix = format!(" at line {} column {}", at.line(), at.column());
                let message = text.replacen(&suffix, "", 1);
                Diagnostic::new(Place::Text { line: at.line(), column: at.column() }, message)
            }
            None => Diagnostic::new(Place::Document, text),
        }
    }
}

/// Every problem found in a definition, in the order they were found. Displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq, Default, thiserror::Error)]
#[error("{}", render(.0))]
pub struct Diagnostics(pub Vec<Diagnostic>);

fn render(all: &[Diagnostic]) -> String {
    all.iter().map(Diagnostic::to_string).collect::<Vec<_>>().join("\n")
}

impl Diagnostics {
    /// How many problems there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no problem at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    /// Records a problem at `place`.
    pub fn push(&mut self, place: Place, message: impl Into<String>) {
        self.0.push(Diagnostic::new(place, message));
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(one: Diagnostic) -> Diagnostics {
        Diagnostics(vec![one])
    }
}

impl<'a> IntoIterator for &'a Diagnostics {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_line_per_problem() {
        let mut all = Diagnostics::default();
        all.push(Place::Text { line: 3, column: 5 }, "did not find expected key");
        all.push(Place::Document, "kind `Remediation` is not Shipyard");
        all.push(Place::stage("dev"), "duplicate stage name");
        all.push(Place::sequence("dev", "delivery"), "has no tasks");
        all.push(Place::task("dev", "delivery", "api-test"), "depends on unknown task `x`");
        expect_test::expect![[r#"
            line 3, column 5: did not find expected key
            document: kind `Remediation` is not Shipyard
            stage "dev": duplicate stage name
            stage "dev" / sequence "delivery": has no tasks
            stage "dev" / sequence "delivery" / task "api-test": depends on unknown task `x`"#]]
        .assert_eq(&all.to_string());
        assert_eq!(all.len(), 5);
    }
}
