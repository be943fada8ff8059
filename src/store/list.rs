//! Listings: every object under a prefix, the "directories" one level under it, whether it
//! holds any, their sizes. A listing error is an error, never an empty answer (restic #4612:
//! a listing error read as "no files" let prune delete data).

use futures::TryStreamExt;
use object_store::ObjectStore;

use super::*;

impl Store {
    /// Every object whose name starts with `prefix/`. object_store retries a page's request,
    /// but not a page whose body breaks off while it is read: the whole listing (read-only,
    /// so safe to repeat) is tried again a few times, as deletes are.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let p = Self::path(prefix);
        let mut wait = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let listed: std::result::Result<Vec<ObjectInfo>, _> = self
                .inner
                .list(Some(&p))
                .map_ok(|m| ObjectInfo {
                    name: m.location.to_string(),
                    size: m.size,
                    modified: store_time(&m),
                })
                .try_collect()
                .await;
            match listed {
                Ok(all) => return Ok(all),
                Err(e @ object_store::Error::NotFound { .. }) => {
                    return Err(store_error("list", &format!("{prefix}/"), e));
                }
                Err(_) if attempt < LIST_ATTEMPTS => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(store_error("list", &format!("{prefix}/"), e)),
            }
        }
    }

    /// The names of the "directories" one level under `prefix/` (`wal/2026-11`, ...): a
    /// listing with a delimiter, which on S3 costs a page per thousand of them, not per
    /// thousand objects. Tried again like [`Store::list`].
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let p = Self::path(prefix);
        let mut wait = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.inner.list_with_delimiter(Some(&p)).await {
                Ok(listed) => {
                    return Ok(listed
                        .common_prefixes
                        .into_iter()
                        .map(|d| d.to_string())
                        .collect());
                }
                Err(e @ object_store::Error::NotFound { .. }) => {
                    return Err(store_error("list", &format!("{prefix}/"), e));
                }
                Err(_) if attempt < LIST_ATTEMPTS => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(store_error("list", &format!("{prefix}/"), e)),
            }
        }
    }

    /// Whether any object lies under `prefix/` (one listing page at most).
    pub async fn has_any(&self, prefix: &str) -> Result<bool> {
        let p = Self::path(prefix);
        match self.inner.list(Some(&p)).try_next().await {
            Ok(first) => Ok(first.is_some()),
            Err(e) => Err(store_error("list", &format!("{prefix}/"), e)),
        }
    }

    /// Name -> size of every object under `prefix/`.
    pub async fn sizes(&self, prefix: &str) -> Result<std::collections::HashMap<String, u64>> {
        Ok(self
            .list(prefix)
            .await?
            .into_iter()
            .map(|o| (o.name, o.size))
            .collect())
    }
}
