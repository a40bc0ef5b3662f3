//! Definitions by project, name and version: stored as YAML, parsed once, shared as `Arc`s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use capstan_engine::Definition;
use capstan_store::Store;

use super::error::RuntimeError;

/// Parsed definitions, cached. Versions are immutable, so the cache never goes stale.
pub struct DefinitionRegistry {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<(String, String, i64), Arc<Definition>>>,
}

impl DefinitionRegistry {
    /// A registry over the store's definitions.
    pub fn new(store: Arc<dyn Store>) -> Self {
        DefinitionRegistry { store, cache: Mutex::new(HashMap::new()) }
    }

    /// Validates and stores a definition; returns its name and version (unchanged text keeps
    /// its version).
    pub async fn apply(&self, project: &str, source: &str, now_ms: i64) -> Result<(String, i64), RuntimeError> {
        let definition =
            capstan_engine::definition::parse(source).map_err(|d| RuntimeError::InvalidDefinition(d.to_string()))?;
        let version = self.store.put_definition(project, &definition.name, source, now_ms).await?;
        let name = definition.name.clone();
        self.lock().insert((project.to_string(), name.clone(), version), Arc::new(definition));
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
