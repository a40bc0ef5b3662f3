//! `ShellWorker`: runs `properties.command` (a string for `sh -c`, or an argv list) with a
//! timeout, and reports the exit code and the tail of stdout and stderr.
//!
//! Properties read (see [`TaskContext::property`]):
//! - `command`: `"make test"` (run by `sh -c`) or `["make", "test"]` (run directly). Required.
//! - `timeout`: `"300ms"`, `"10s"`, `"5m"`, `"1h"` or a number of seconds; else the award's
//!   start-to-close budget; else the configured default.
//! - `env`: an object of environment variables; `cwd`: the working directory.
//! - `exitResults`: maps exit codes to results, e.g. `{"0": "pass", "1": "warning"}`. Exit 0 is
//!   `pass` unless mapped; an unmapped non-zero code is an error of kind `exit-code`.
//!
//! Errors: `bad-input` (no or malformed command), `spawn` (could not start), `exit-code`,
//! `timeout` and `cancelled` (the process group was killed).

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use capstan_proto::TaskResult;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::handler::{Handler, Outcome, TaskContext};

/// How a [`ShellWorker`] runs commands.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    /// How many bytes of the end of stdout and of stderr are kept.
    pub output_limit: usize,
    /// The timeout when neither the task nor the award gives one.
    pub default_timeout: Duration,
}

impl Default for ShellConfig {
    fn default() -> Self {
        ShellConfig {
            output_limit: 16 * 1024,
            default_timeout: Duration::from_secs(3600),
        }
    }
}

/// The shell command handler.
#[derive(Debug, Clone, Default)]
pub struct ShellWorker {
    config: ShellConfig,
}

impl ShellWorker {
    /// A shell handler with default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// A shell handler with the given limits.
    pub fn with_config(config: ShellConfig) -> Self {
        ShellWorker { config }
    }
}

/// How the process ended.
enum Ending {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut(Duration),
    Cancelled,
}

#[async_trait]
impl Handler for ShellWorker {
    async fn handle(&self, task: TaskContext) -> Outcome {
        let mut cmd = match command(&task) {
            Ok(cmd) => cmd,
            Err(message) => return Outcome::error("bad-input", message),
        };
        let limit = match task.property("timeout") {
            Some(v) => match parse_timeout(v) {
                Some(d) => d,
                None => {
                    return Outcome::error("bad-input", format!("timeout {v} is not a duration"));
                }
            },
            None => task.start_to_close().unwrap_or(self.config.default_timeout),
        };
        // Its own process group, so that a timeout or cancel kills what the shell started too.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return Outcome::error("spawn", format!("could not start the command: {e}")),
        };
        let pid = child.id();
        let keep = self.config.output_limit;
        let stdout = child
            .stdout
            .take()
            .map(|r| tokio::spawn(read_tail(r, keep)));
        let stderr = child
            .stderr
            .take()
            .map(|r| tokio::spawn(read_tail(r, keep)));
        let ending = tokio::select! {
            status = child.wait() => Ending::Exited(status),
            _ = tokio::time::sleep(limit) => Ending::TimedOut(limit),
            _ = task.cancelled() => Ending::Cancelled,
        };
        if !matches!(ending, Ending::Exited(_)) {
            kill_group(pid).await;
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        let (out, out_cut) = collect(stdout).await;
        let (err, err_cut) = collect(stderr).await;
        let mut output = json!({"stdout": out, "stderr": err, "stdoutTruncated": out_cut, "stderrTruncated": err_cut});
        let status = match ending {
            Ending::Exited(Ok(status)) => status,
            Ending::Exited(Err(e)) => {
                return Outcome::error("spawn", format!("waiting for the command failed: {e}"));
            }
            Ending::TimedOut(d) => {
                return Outcome::error("timeout", format!("killed after {d:?}; stderr: {err}"));
            }
            Ending::Cancelled => {
                return Outcome::error("cancelled", "killed: the attempt was cancelled");
            }
        };
        let Some(code) = status.code() else {
            return Outcome::error(
                "signal",
                format!("the command was killed by a signal ({status})"),
            );
        };
        output["exitCode"] = json!(code);
        let mapped = task
            .property("exitResults")
            .and_then(|m| m.get(code.to_string()))
            .and_then(Value::as_str)
            .and_then(TaskResult::parse);
        match (mapped, code) {
            (Some(result), _) => Outcome::Finished { result, output },
            (None, 0) => Outcome::pass(output),
            (None, _) => Outcome::error(
                "exit-code",
                format!("exit code {code}; stderr: {}", tail(&err, 512)),
            ),
        }
    }
}

/// The command from `properties.command`, with `env` and `cwd`.
fn command(task: &TaskContext) -> Result<Command, String> {
    let mut cmd = match task.property("command") {
        Some(Value::String(line)) if !line.trim().is_empty() => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(line);
            cmd
        }
        Some(Value::Array(argv)) if !argv.is_empty() => {
            let argv: Option<Vec<&str>> = argv.iter().map(Value::as_str).collect();
            let argv = argv.ok_or("command: every argv element must be a string")?;
            let mut cmd = Command::new(argv[0]);
            cmd.args(&argv[1..]);
            cmd
        }
        Some(_) => return Err("command: must be a non-empty string or list of strings".into()),
        None => return Err("command: missing".into()),
    };
    if let Some(env) = task.property("env") {
        let Value::Object(env) = env else {
            return Err("env: must be an object".into());
        };
        for (k, v) in env {
            let value = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            cmd.env(k, value);
        }
    }
    if let Some(cwd) = task.property("cwd") {
        cmd.current_dir(cwd.as_str().ok_or("cwd: must be a string")?);
    }
    Ok(cmd)
}

/// `"300ms"`, `"10s"`, `"5m"`, `"1h"`, or a number of seconds.
fn parse_timeout(v: &Value) -> Option<Duration> {
    if let Some(secs) = v.as_f64() {
        return (secs >= 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs));
    }
    let s = v.as_str()?.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

/// Reads a stream to its end, keeping only the last `keep` bytes; says whether any were cut.
async fn read_tail(mut r: impl AsyncRead + Unpin, keep: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::with_capacity(keep.min(64 * 1024));
    let mut chunk = vec![0u8; 8192];
    let mut cut = false;
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                // Trim in bulk, not per chunk, so the copying stays linear in the output size.
                if buf.len() > 2 * keep.max(8192) {
                    buf.drain(..buf.len() - keep);
                    cut = true;
                }
            }
        }
    }
    if buf.len() > keep {
        buf.drain(..buf.len() - keep);
        cut = true;
    }
    (buf, cut)
}

/// The captured tail as text. A grandchild that left the process group may hold the pipe open
/// forever, so the reader gets one second after the process ended.
async fn collect(reader: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>) -> (String, bool) {
    let Some(mut reader) = reader else {
        return (String::new(), false);
    };
    match tokio::time::timeout(Duration::from_secs(1), &mut reader).await {
        Ok(Ok((bytes, cut))) => (String::from_utf8_lossy(&bytes).into_owned(), cut),
        _ => {
            reader.abort();
            (String::new(), false)
        }
    }
}

/// The last `n` bytes of `s`, on a character boundary.
fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Kills the process group led by `pid`. `kill(1)` does it without unsafe code (the workspace
/// forbids it) and without a libc binding.
async fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid else { return };
    let killed = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = killed {
        tracing::warn!(pid, error = %e, "could not kill the process group");
    }
}

#[cfg(test)]
mod tests;
