//! Definitions by project, name and version: stored as YAML, parsed once, shared as `Arc`s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capstan_engine::Definition;
use capstan_store::Store;

use super::error::RuntimeError;

/// How long the latest version of a definition is taken from memory before the store is asked
/// again. This process's own `apply` updates it at once; the bound only matters for a version
/// stored by another process.
const LATEST_TTL: Duration = Duration::from_secs(2);

/// Parsed definitions, cached. Versions are immutable, so the cache never goes stale; which
/// version is the latest is remembered for [`LATEST_TTL`], so a burst of triggers costs no store
/// reads.
pub struct DefinitionRegistry {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<(String, String, i64), Arc<Definition>>>,
    /// `(project, name or "" for "the project's only one")` -> `(name, latest version, when seen)`.
    latest: Mutex<HashMap<(String, String), Latest>>,
}

/// The latest version of a definition as last seen: its name, version, and when.
type Latest = (String, i64, Instant);

impl DefinitionRegistry {
    /// A registry over the store's definitions.
    pub fn new(store: Arc<dyn Store>) -> Self {
        DefinitionRegistry { store, cache: Mutex::new(HashMap::new()), latest: Mutex::new(HashMap::new()) }
    }

    /// Validates and stores a definition; returns its name and version (unchanged text keeps
    /// its version).
    pub async fn apply(&self, project: &str, source: &str, now_ms: i64) -> Result<(String, i64), RuntimeError> {
        let definition =
            capstan_engine::definition::parse(source).map_err(|d| RuntimeError::InvalidDefinition(d.to_string()))?;
        let version = self.store.put_definition(project, &definition.name, source, now_ms).await?;
        let name = definition.name.clone();
        self.lock().insert((project.to_string(), name.clone(), version), Arc::new(definition));
        // Forget what was the latest: the next trigger reads it again (also the project's only
        // definition, which may not be the only one any more).
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).retain(|(p, _), _| p != project);
        Ok((name, version))
    }

    /// A definition version, or the latest when `version` is `None`; with no name, the project's
    /// only definition.
    pub async fn get(
        &self,
        project: &str,
        name: Option<&str>,
        version: Option<i64>,
    ) -> Result<(Arc<Definition>, i64), RuntimeError> {
        if version.is_none() {
            let key = (project.to_string(), name.unwrap_or_default().to_string());
            let known = self.latest.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
            if let Some((name, v, seen)) = known
                && seen.elapsed() < LATEST_TTL
                && let Some(hit) = self.lock().get(&(project.to_string(), name, v))
            {
                return Ok((hit.clone(), v));
            }
            let (definition, v) = self.lookup(project, name, None).await?;
            let entry = (definition.name.clone(), v, Instant::now());
            self.latest.lock().unwrap_or_else(|e| e.into_inner()).insert(key, entry);
            return Ok((definition, v));
        }
        self.lookup(project, name, version).await
    }

    /// [`get`](Self::get) from the store (parsed versions still come from the cache).
    async fn lookup(
        &self,
        project: &str,
        name: Option<&str>,
        version: Option<i64>,
    ) -> Result<(Arc<Definition>, i64), RuntimeError> {
        let name = match name {
            Some(n) => n.to_string(),
            None => {
                let all = self.store.list_definitions(project).await?;
                match all.as_slice() {
                    [one] => one.name.clone(),
                    [] => return Err(RuntimeError::NotFound(format!("a definition in project `{project}`"))),
                    _ => {
                        return Err(RuntimeError::InvalidDefinition(format!(
                            "project `{project}` has {} definitions; name one",
                            all.len()
                        )));
                    }
                }
            }
        };
        if let Some(v) = version
            && let Some(hit) = self.lock().get(&(project.to_string(), name.clone(), v))
        {
            return Ok((hit.clone(), v));
        }
        let record = self
            .store
            .get_definition(project, &name, version)
            .await?
            .ok_or_else(|| RuntimeError::NotFound(format!("definition `{name}` in project `{project}`")))?;
        let key = (project.to_string(), name, record.version);
        if let Some(hit) = self.lock().get(&key) {
            return Ok((hit.clone(), record.version));
        }
        let parsed = capstan_engine::definition::parse(&record.source)
            .map_err(|d| RuntimeError::InvalidDefinition(d.to_string()))?;
        let parsed = Arc::new(parsed);
        self.lock().insert(key, parsed.clone());
        Ok((parsed, record.version))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, i64), Arc<Definition>>> {
        // A poisoned cache only means a panic elsewhere; the map itself is still consistent.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use capstan_store::{Definitions, MemoryStore};

    use super::*;

    const V1: &str = "apiVersion: capstan.dev/v1\nkind: Shipyard\nmetadata: {name: shop}\nspec:\n  stages:\n    - name: dev\n      sequences:\n        - name: d\n          tasks: [{name: a}]\n";

    #[tokio::test]
    async fn the_latest_version_follows_applies_and_other_writers_within_the_ttl() {
        let store = Arc::new(MemoryStore::new());
        let registry = DefinitionRegistry::new(store.clone());
        assert!(matches!(registry.get("p", None, None).await, Err(RuntimeError::NotFound(_))));
        registry.apply("p", V1, 1).await.expect("v1");
        assert_eq!(registry.get("p", None, None).await.expect("latest").1, 1);
        assert_eq!(registry.get("p", Some("shop"), None).await.expect("latest by name").1, 1);
        // This process's apply is seen at once.
        registry.apply("p", &V1.replace("name: a", "name: b"), 2).await.expect("v2");
        assert_eq!(registry.get("p", None, None).await.expect("latest").1, 2);
        // A version stored behind the registry's back is seen once the remembered one expired.
        store.put_definition("p", "shop", &V1.replace("name: a", "name: c"), 3).await.expect("v3");
        assert_eq!(registry.get("p", Some("shop"), Some(3)).await.expect("pinned").1, 3);
        registry.latest.lock().expect("lock").values_mut().for_each(|e| e.2 -= LATEST_TTL);
        assert_eq!(registry.get("p", None, None).await.expect("latest").1, 3);
    }
}
