//! Who may do what: API tokens (kept as SHA-256 hashes, compared in constant time), each good for
//! some projects with one role. Every API call names the project it acts in (for a run, the
//! project recorded in the run index) and the role it needs; everything else is denied.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::config::{AuthMode, TokenConfig};

/// What a token may do, each role including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read definitions, runs and events.
    Viewer,
    /// Also trigger, cancel, pause, resume, approve and publish events.
    Operator,
    /// Also apply definitions.
    Admin,
}

impl Role {
    fn verb(self) -> &'static str {
        match self {
            Role::Viewer => "read",
            Role::Operator => "operate on",
            Role::Admin => "administer",
        }
    }
}

/// A configured token, decoded.
#[derive(Clone)]
struct Token {
    name: String,
    hash: [u8; 32],
    projects: Vec<String>,
    role: Role,
}

/// The access policy of a server.
#[derive(Clone)]
pub struct Auth {
    mode: AuthMode,
    tokens: Vec<Token>,
}

/// Who a caller turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Auth is off: everything is allowed.
    Anyone,
    /// A token, by its configured name.
    Token { name: String },
}

impl Caller {
    /// A name to record (e.g. who approved a task).
    pub fn name(&self) -> &str {
        match self {
            Caller::Anyone => "anonymous",
            Caller::Token { name } => name,
        }
    }
}

impl Auth {
    /// No authentication: every caller may do everything (`capstan dev` on loopback).
    pub fn disabled() -> Self {
        Auth { mode: AuthMode::None, tokens: Vec::new() }
    }

    /// The policy of a configuration. Hashes were checked by `Config::load`; a bad one is skipped.
    pub fn from_config(mode: AuthMode, tokens: &[TokenConfig]) -> Self {
        let tokens = tokens
            .iter()
            .filter_map(|t| {
                let bytes = hex::decode(&t.sha256).ok()?;
                let hash: [u8; 32] = bytes.try_into().ok()?;
                Some(Token { name: t.name.clone(), hash, projects: t.projects.clone(), role: t.role })
            })
            .collect();
        Auth { mode, tokens }
    }

    /// Whether callers must present tokens.
    pub fn enabled(&self) -> bool {
        self.mode == AuthMode::Tokens
    }

    /// Checks that the bearer of `token` may act in `project` with at least `role`.
    pub fn authorize(&self, token: Option<&str>, project: &str, role: Role) -> Result<Caller, ApiError> {
        if !self.enabled() {
            return Ok(Caller::Anyone);
        }
        let token = self.identify(token)?;
        let project_ok = token.projects.iter().any(|p| p == "*" || p == project);
        if !project_ok {
            return Err(ApiError::PermissionDenied(format!(
                "token `{}` has no access to project `{project}`",
                token.name
            )));
        }
        if token.role < role {
            return Err(ApiError::PermissionDenied(format!(
                "token `{}` may not {} project `{project}` (role {:?}, needs {:?})",
                token.name,
                role.verb(),
                token.role,
                role
            )));
        }
        Ok(Caller::Token { name: token.name.clone() })
    }

    /// Checks only that the token is known (for calls that touch no project, like Validate).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        if !self.enabled() {
            return Ok(Caller::Anyone);
        }
        self.identify(token).map(|t| Caller::Token { name: t.name.clone() })
    }

    fn identify(&self, token: Option<&str>) -> Result<&Token, ApiError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthenticated("a bearer token is required".into()))?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every token without stopping early, so timing says nothing about which
        // stored hash came close.
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.hash.ct_eq(&presented)) {
                found = Some(t);
            }
        }
        found.ok_or_else(|| ApiError::Unauthenticated("the token is not valid".into()))
    }
}

/// The token of an `Authorization: Bearer <token>` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The hex SHA-256 of a token, as the `[[tokens]]` section wants it.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Auth {
        let token = |name: &str, projects: &[&str], role| TokenConfig {
            name: name.into(),
            sha256: hash_token(name),
            projects: projects.iter().map(|p| p.to_string()).collect(),
            role,
        };
        Auth::from_config(
            AuthMode::Tokens,
            &[
                token("view-a", &["a"], Role::Viewer),
                token("op-a", &["a"], Role::Operator),
                token("root", &["*"], Role::Admin),
            ],
        )
    }

    #[test]
    fn roles_and_projects() {
        let auth = policy();
        assert!(auth.authorize(Some("view-a"), "a", Role::Viewer).is_ok());
        assert!(matches!(auth.authorize(Some("view-a"), "a", Role::Operator), Err(ApiError::PermissionDenied(_))));
        assert!(auth.authorize(Some("op-a"), "a", Role::Operator).is_ok());
        assert!(matches!(auth.authorize(Some("op-a"), "b", Role::Viewer), Err(ApiError::PermissionDenied(_))));
        assert!(matches!(auth.authorize(Some("op-a"), "a", Role::Admin), Err(ApiError::PermissionDenied(_))));
        assert!(auth.authorize(Some("root"), "anything", Role::Admin).is_ok());
        assert!(matches!(auth.authorize(None, "a", Role::Viewer), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(auth.authorize(Some("nope"), "a", Role::Viewer), Err(ApiError::Unauthenticated(_))));
        assert_eq!(Auth::disabled().authorize(None, "a", Role::Admin).unwrap(), Caller::Anyone);
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }
}
