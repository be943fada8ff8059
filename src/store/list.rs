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
        self.listing(prefix, || {
            self.inner
                .list(Some(&p))
                .map_ok(|m| ObjectInfo {
                    name: m.location.to_string(),
                    size: m.size,
                    modified: store_time(&m),
                })
                .try_collect()
        })
        .await
    }

    /// The names of the "directories" one level under `prefix/` (`wal/2026-11`, ...): a
    /// listing with a delimiter, which on S3 costs a page per thousand of them, not per
    /// thousand objects. Tried again like [`Store::list`].
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let p = Self::path(prefix);
        let listed = self
            .listing(prefix, || self.inner.list_with_delimiter(Some(&p)))
            .await?;
        Ok(listed
            .common_prefixes
            .into_iter()
            .map(|d| d.to_string())
            .collect())
    }

    /// Runs the listing `attempt` of `prefix/` until it succeeds, at most `LIST_ATTEMPTS`
    /// times with a doubling wait; "not found" is final at once.
    async fn listing<T, F, Fut>(&self, prefix: &str, attempt: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, object_store::Error>>,
    {
        let mut wait = Duration::from_millis(200);
        let mut tries = 1;
        loop {
            match attempt().await {
                Ok(listed) => return Ok(listed),
                Err(e @ object_store::Error::NotFound { .. }) => {
                    return Err(store_error("list", &format!("{prefix}/"), e));
                }
                Err(_) if tries < LIST_ATTEMPTS => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    tries += 1;
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
