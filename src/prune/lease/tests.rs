use super::*;

async fn repo_at(url: &str) -> Repository {
    crate::repository::for_tests(url).await
}

fn lease(host: &str, stamp: Timestamp) -> Lease {
    let me = Me::read();
    Lease {
        id: ObjectId::random(),
        run: ObjectId::random(),
        host: host.into(),
        machine: me.machine,
        boot: me.boot,
        pid_ns: me.pid_ns,
        uid: me.uid,
        pid: me.pid,
        pid_start: me.pid_start,
        started: stamp,
        ttl_seconds: 1,
    }
}

async fn leases(repo: &Repository) -> Vec<ObjectId> {
    list_records(repo, name::PRUNE_LEASES, &mut Vec::new())
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

async fn plant(repo: &Repository, lease: &Lease) -> String {
    let object = name::prune_object(name::PRUNE_LEASES, &lease.id);
    put_json(repo, &object, lease).await.unwrap();
    object
}

#[tokio::test]
async fn one_prune_at_a_time() {
    let repo = repo_at("memory://").await;
    let first = LeaseGuard::acquire(&repo, "a", LEASE_TTL).await.unwrap();
    let second = LeaseGuard::acquire(&repo, "b", LEASE_TTL)
        .await
        .err()
        .unwrap();
    assert!(matches!(second, Error::Conflict(_)), "{second}");
    assert!(second.to_string().contains("host a"), "{second}");
    // The loser withdrew its lease; only the holder's is left.
    assert_eq!(leases(&repo).await.len(), 1);
    first.check().await.unwrap();
    first.release().await.unwrap();
    let third = LeaseGuard::acquire(&repo, "c", LEASE_TTL).await.unwrap();
    third.release().await.unwrap();
    assert!(leases(&repo).await.is_empty());
}

/// A lease written by a host whose clock is hours behind claims to have expired long ago;
/// only the store's time counts, so it still holds the repository.
#[tokio::test]
async fn a_lease_is_timed_by_the_store_not_by_its_writer() {
    let repo = repo_at("memory://").await;
    let mut behind = lease("behind", Timestamp::UNIX_EPOCH);
    behind.run = ObjectId::random();
    behind.ttl_seconds = 3600;
    behind.pid = 1 << 23; // no such process here, but another machine's
    behind.machine = "another machine".into();
    plant(&repo, &behind).await;
    let e = LeaseGuard::acquire(&repo, "here", LEASE_TTL)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("host behind"), "{e}");
}

/// The store says when a lease was written: one older than its time to live is over,
/// whatever its writer's clock said.
#[tokio::test]
async fn a_lease_past_its_time_on_the_store_is_taken_over() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = dir.path().join("repo").display().to_string();
    let repo = repo_at(&url).await;
    let mut old = lease("crashed", Timestamp::now());
    old.machine = "another machine".into();
    old.ttl_seconds = 3600;
    let object = plant(&repo, &old).await;
    let path = dir.path().join("repo").join(&object);
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    filetime::set_file_mtime(&path, filetime::FileTime::from_system_time(two_hours_ago)).unwrap();
    let guard = LeaseGuard::acquire(&repo, "d", LEASE_TTL).await.unwrap();
    assert_eq!(
        leases(&repo).await,
        vec![guard.state.lock().unwrap().current]
    );
}

#[tokio::test]
async fn only_a_dead_process_of_this_machine_and_boot_loses_its_lease_early() {
    let repo = repo_at("memory://").await;
    // Same host name, another machine: it cannot be judged from here, so it holds.
    let mut twin = lease("same-name", Timestamp::now());
    twin.pid = 1 << 23;
    twin.machine = "another machine".into();
    twin.ttl_seconds = 3600;
    let twin_object = plant(&repo, &twin).await;
    assert!(
        LeaseGuard::acquire(&repo, "same-name", LEASE_TTL)
            .await
            .is_err()
    );
    // This machine, another boot: also held (its prune may be on a machine cloned from
    // this one's image).
    let mut rebooted = twin.clone();
    rebooted.machine = Me::read().machine;
    rebooted.boot = "another boot".into();
    repo.store().delete(&twin_object).await.unwrap();
    let rebooted_object = plant(&repo, &rebooted).await;
    if !Me::read().boot.is_empty() {
        assert!(
            LeaseGuard::acquire(&repo, "same-name", LEASE_TTL)
                .await
                .is_err()
        );
    }
    repo.store().delete(&rebooted_object).await.unwrap();
    // This machine, this boot, a pid that does not exist, or exists with another start
    // time (reused): its prune was killed, so the lease is taken over at once.
    let mut dead = lease("same-name", Timestamp::now());
    dead.pid = 1 << 23;
    dead.ttl_seconds = 3600;
    plant(&repo, &dead).await;
    let mut reused = lease("same-name", Timestamp::now());
    reused.pid_start += 1;
    reused.ttl_seconds = 3600;
    plant(&repo, &reused).await;
    if !Me::read().machine.is_empty() && !Me::read().boot.is_empty() {
        let guard = LeaseGuard::acquire(&repo, "same-name", LEASE_TTL)
            .await
            .unwrap();
        assert_eq!(leases(&repo).await.len(), 1);
        guard.release().await.unwrap();
    }
    // Another pid namespace (a container) on this machine and boot: its pids mean nothing
    // here, so it holds.
    let mut contained = lease("same-name", Timestamp::now());
    contained.pid = 1 << 23;
    contained.pid_ns = "pid:[1]".into();
    contained.ttl_seconds = 3600;
    let contained_object = plant(&repo, &contained).await;
    assert!(
        LeaseGuard::acquire(&repo, "same-name", LEASE_TTL)
            .await
            .is_err()
    );
    repo.store().delete(&contained_object).await.unwrap();
    // A live process of this machine (this one) keeps its lease.
    let mut alive = lease("same-name", Timestamp::now());
    alive.ttl_seconds = 3600;
    plant(&repo, &alive).await;
    assert!(
        LeaseGuard::acquire(&repo, "same-name", LEASE_TTL)
            .await
            .is_err()
    );
}

/// A lease object that cannot be read (an older kluis's, or junk a bucket writer left)
/// neither breaks prune nor lets it run beside a prune it cannot see: it counts as a lease
/// for the longest time to live, and is removed after.
#[tokio::test]
async fn an_unreadable_lease_counts_until_the_longest_time_to_live() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = dir.path().join("repo").display().to_string();
    let repo = repo_at(&url).await;
    let object = name::prune_object(name::PRUNE_LEASES, &ObjectId::random());
    repo.store()
        .put(&object, bytes::Bytes::from_static(b"not a lease"))
        .await
        .unwrap();
    let e = LeaseGuard::acquire(&repo, "here", LEASE_TTL)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("cannot be read"), "{e}");
    let path = dir.path().join("repo").join(&object);
    let old = std::time::SystemTime::now() - MAX_TTL - Duration::from_secs(60);
    filetime::set_file_mtime(&path, filetime::FileTime::from_system_time(old)).unwrap();
    let guard = LeaseGuard::acquire(&repo, "here", LEASE_TTL).await.unwrap();
    assert_eq!(leases(&repo).await.len(), 1);
    guard.release().await.unwrap();
}

/// A prune that runs longer than its lease's time to live keeps it by renewing: nobody
/// else gets in, and its check passes throughout.
#[tokio::test]
async fn a_long_prune_renews_its_lease() {
    let repo = repo_at("memory://").await;
    let ttl = Duration::from_secs(2);
    let guard = LeaseGuard::acquire(&repo, "long", ttl).await.unwrap();
    let first = guard.state.lock().unwrap().current;
    guard
        .hold(async {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                // Two time-to-lives in: the original lease object has long expired.
                let e = LeaseGuard::acquire(&repo, "other", ttl)
                    .await
                    .err()
                    .unwrap();
                assert!(e.to_string().contains("host long"), "{e}");
                guard.check().await.unwrap();
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_ne!(guard.state.lock().unwrap().current, first, "never renewed");
    assert_eq!(leases(&repo).await.len(), 1);
    guard.release().await.unwrap();
}

/// A prune that was stopped (SIGSTOP, a suspended VM) past its lease finds out before it
/// changes anything more.
#[tokio::test]
async fn a_lapsed_lease_stops_the_prune() {
    let repo = repo_at("memory://").await;
    let ttl = Duration::from_secs(2);
    let guard = LeaseGuard::acquire(&repo, "stopped", ttl).await.unwrap();
    // No renewal (not inside `hold`), as if the process had been frozen.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let e = guard.check().await.unwrap_err();
    assert!(e.to_string().contains("last renewed"), "{e}");
    // Meanwhile another prune found the lease expired and took the repository.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let other = LeaseGuard::acquire(&repo, "other", ttl).await.unwrap();
    // Thawed, it renews at once; the other run's lease still stops it.
    guard.renew().await;
    let e = guard.check().await.unwrap_err();
    assert!(e.to_string().contains("another prune holds"), "{e}");
    assert!(e.to_string().contains("host other"), "{e}");
    other.release().await.unwrap();
}
