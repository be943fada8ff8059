//! A three-node Garage cluster on loopback (replication factor 3, one node per zone), for the
//! reliability suite: nodes can be killed and started again while kluis works.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{Repo, free_port, garage_binary, hex, random_bytes, text};

pub struct Node {
    pub config: PathBuf,
    pub s3: u16,
    rpc: u16,
    id: String,
    child: Option<Child>,
}

pub struct Cluster {
    pub dir: TempDir,
    pub nodes: Vec<Node>,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

/// Writes a Garage node's configuration (0600, as Garage wants its secret kept): data under
/// `dir`, loopback ports `(rpc, s3, admin)`.
pub fn write_config(
    config: &Path,
    dir: &Path,
    replication: usize,
    (rpc, s3, admin): (u16, u16, u16),
    secret: &str,
) {
    fs::write(
        config,
        format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = {replication}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(config, fs::Permissions::from_mode(0o600)).unwrap();
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        let dir = TempDir::new().unwrap();
        let secret = hex(&random_bytes(u64::from(std::process::id()) << 8 | 3, 32));
        let mut nodes = Vec::new();
        for i in 0..n {
            let (rpc, s3, admin) = (free_port(), free_port(), free_port());
            let d = dir.path().join(format!("node{i}"));
            fs::create_dir_all(&d).unwrap();
            let config = d.join("garage.toml");
            write_config(&config, &d, n, (rpc, s3, admin), &secret);
            nodes.push(Node {
                config,
                s3,
                rpc,
                id: String::new(),
                child: None,
            });
        }
        let mut c = Cluster {
            dir,
            nodes,
            bucket: "kluis-cluster".into(),
            access_key: String::new(),
            secret_key: String::new(),
        };
        for i in 0..n {
            c.start_node(i);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let ids: Vec<String> = (0..n)
            .map(|i| {
                loop {
                    match c.cli(i, &["node", "id", "-q"]) {
                        Ok(id) => break id.trim().split('@').next().unwrap().to_string(),
                        Err(e) if Instant::now() > deadline => panic!("{e}"),
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
            .collect();
        for (node, id) in c.nodes.iter_mut().zip(&ids) {
            node.id = id.clone();
        }
        let retry = |c: &Cluster, args: &[&str]| loop {
            match c.cli(0, args) {
                Ok(out) => break out,
                Err(e) if Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        for (i, id) in ids.iter().enumerate().skip(1) {
            let peer = format!("{id}@127.0.0.1:{}", c.nodes[i].rpc);
            retry(&c, &["node", "connect", &peer]);
        }
        for (i, id) in ids.iter().enumerate() {
            retry(
                &c,
                &["layout", "assign", "-z", &format!("dc{i}"), "-c", "1G", id],
            );
        }
        retry(&c, &["layout", "apply", "--version", "1"]);
        let bucket = c.bucket.clone();
        retry(&c, &["bucket", "create", &bucket]);
        let info = retry(&c, &["key", "create", "kluis-cluster-key"]);
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in garage key output: {info}"))
        };
        c.access_key = field("Key ID:");
        c.secret_key = field("Secret key:");
        retry(
            &c,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                &bucket,
                "--key",
                "kluis-cluster-key",
            ],
        );
        c
    }

    fn cli(&self, node: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(garage_binary())
            .arg("-c")
            .arg(&self.nodes[node].config)
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(format!(
                "garage {args:?}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            ))
        }
    }

    /// Starts node `i` (again).
    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.config.with_file_name("server.log"))
            .unwrap();
        node.child = Some(
            Command::new(garage_binary())
                .arg("-c")
                .arg(&node.config)
                .arg("server")
                .env("RUST_LOG", "warn")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start garage"),
        );
    }

    /// Starts node `i` again and waits until node 0 sees every node connected.
    pub fn restart_node(&mut self, i: usize) {
        self.start_node(i);
        let peer = format!("{}@127.0.0.1:{}", self.nodes[i].id, self.nodes[i].rpc);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let connected = self.cli(0, &["node", "connect", &peer]).is_ok();
            let status = self.cli(0, &["status"]).unwrap_or_default();
            let healthy = status.lines().filter(|l| l.contains("127.0.0.1:")).count();
            if connected && !status.contains("FAILED") && healthy == self.nodes.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not rejoin: {status}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILLs node `i`.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A repository in the cluster's bucket, reached through node `via`'s S3 API.
    pub fn repo(&self, prefix: &str, via: usize) -> Repo {
        let url = format!(
            "s3://{}/{prefix}?endpoint=http://127.0.0.1:{}&region=garage&path-style=true",
            self.bucket, self.nodes[via].s3
        );
        let env = BTreeMap::from([
            ("AWS_ACCESS_KEY_ID".to_string(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), self.secret_key.clone()),
        ]);
        Repo::at(TempDir::new().unwrap(), url, env)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}
