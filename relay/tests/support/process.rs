//! Servers and relays a test owns: a Postgres cluster or Kafka broker of its own (for tests that
//! restart them), and `relay` processes it can kill.

use super::{env_or, unique_name};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY-free: read our uid from /proc instead of calling libc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A command run as the `postgres` user when we are root (Postgres refuses to run as root).
fn pg_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A self-signed certificate for localhost and 127.0.0.1 as `server.crt`/`server.key` in a
/// cluster's data directory (Postgres's defaults for `ssl = on`), made as the cluster's owner.
pub fn make_server_cert(data: &Path) {
    let out = pg_command(Path::new("openssl"))
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(data.join("server.key"))
        .arg("-out")
        .arg(data.join("server.crt"))
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway Postgres cluster with the stack's settings, for tests that restart Postgres.
pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        Self::start_with(|_| (String::new(), String::new()))
    }

    /// A cluster whose data directory `setup` prepares after initdb: it returns settings to
    /// append to postgresql.conf and, when not empty, the whole pg_hba.conf.
    pub fn start_with(setup: impl FnOnce(&Path) -> (String, String)) -> PgCluster {
        let bin = PathBuf::from(env_or("STACK_PG_BIN", "/usr/lib/postgresql/15/bin"));
        let dir = Self::new_dir();
        let data = dir.join("data");
        let out = pg_command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let conf = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.conf"),
        )
        .expect("scripts/postgres.conf");
        let (own_conf, hba) = setup(&data);
        if !hba.is_empty() {
            std::fs::write(data.join("pg_hba.conf"), hba).expect("pg_hba.conf");
        }
        let extra = format!(
            "{conf}\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = ''\nmax_connections = 50\nshared_buffers = 32MB\n{own_conf}",
            dir.display()
        );
        append_conf(&data, &extra);
        let c = PgCluster { dir, port, bin };
        c.pg_ctl(&["start", "-w", "-t", "60"]);
        c
    }

    /// A fresh directory for a cluster, owned by the user Postgres runs as.
    fn new_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(unique_name("relay_pg"));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(ok.success(), "chown the cluster dir to postgres");
        }
        dir
    }

    /// A streaming standby of this cluster, on a port of its own: `pg_basebackup -R` (which
    /// writes `standby.signal` and `primary_conninfo`), started and ready for read-only queries.
    /// It keeps 1 GB of WAL (`wal_keep_size`) so a slot copied into it later still finds the WAL
    /// it needs, and reports its slots' horizons to the primary (`hot_standby_feedback`).
    pub fn standby(&self) -> PgCluster {
        let dir = Self::new_dir();
        let data = dir.join("data");
        let out = pg_command(&self.bin.join("pg_basebackup"))
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast"])
            .output()
            .expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        append_conf(
            &data,
            &format!(
                "\nport = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n\
                 hot_standby_feedback = on\nwal_keep_size = 1GB\n",
                dir.display()
            ),
        );
        let c = PgCluster {
            dir,
            port,
            bin: self.bin.clone(),
        };
        c.pg_ctl(&["start", "-w", "-t", "60"]);
        c
    }

    /// `pg_ctl promote`: the standby ends recovery and starts a new timeline. Waits until it
    /// accepts writes.
    pub fn promote(&self) {
        let out = pg_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["promote", "-w", "-t", "60"])
            .output()
            .expect("run pg_ctl promote");
        assert!(
            out.status.success(),
            "pg_ctl promote: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Copies the stopped cluster's data directory aside (as a disk snapshot would) and returns
    /// where the copy is.
    pub fn copy_data(&self) -> PathBuf {
        let copy = self.dir.join(unique_name("data_copy"));
        self.run_as_postgres("cp", &[&self.dir.join("data"), &copy], "-a");
        copy
    }

    /// Replaces the stopped cluster's data directory with `copy` (from [`Self::copy_data`]), as
    /// restoring a disk snapshot would: same system identifier, same timeline, older WAL.
    pub fn put_back_data(&self, copy: &Path) {
        let data = self.dir.join("data");
        self.run_as_postgres("rm", &[&data], "-rf");
        self.run_as_postgres("mv", &[copy, &data], "-T");
    }

    fn run_as_postgres(&self, program: &str, paths: &[&Path], flag: &str) {
        let out = pg_command(Path::new(program))
            .arg(flag)
            .args(paths)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {paths:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Copies the replication slot `slot` from `primary`'s data directory into this (stopped)
    /// cluster's, as failover tooling does for logical slots before Postgres 17 (Postgres 15
    /// neither replicates slots nor creates logical ones on a standby). The slot is loaded when
    /// the cluster starts. Its state on disk is the primary's at its last checkpoint.
    pub fn copy_slot_from(&self, primary: &PgCluster, slot: &str) {
        let from = primary.dir.join("data").join("pg_replslot").join(slot);
        let to = self.dir.join("data").join("pg_replslot");
        self.run_as_postgres("cp", &[&from, &to], "-a");
    }

    fn pg_ctl(&self, args: &[&str]) {
        let log = self.dir.join("postgres.log");
        let out = pg_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(&log)
            .args(args)
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `pg_ctl stop -m <mode> -t <secs>`; Err with pg_ctl's output when the server did
    /// not stop within that time (it is left running then).
    pub fn stop_within(&self, mode: &str, secs: u32) -> Result<(), String> {
        let out = pg_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", mode, "-w", "-t", &secs.to_string()])
            .output()
            .expect("run pg_ctl");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Starts a stopped cluster.
    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }

    /// Stops (with `mode`: fast or immediate, the latter like a crash) and starts again.
    pub fn restart(&self, mode: &str) {
        self.pg_ctl(&["stop", "-m", mode, "-w"]);
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }
}

/// Appends `text` to the cluster's postgresql.conf.
fn append_conf(data: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .expect("postgresql.conf");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write postgresql.conf");
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A single-node KRaft broker of a test's own, for tests that restart Kafka.
pub struct KafkaBroker {
    pub dir: PathBuf,
    pub port: u16,
    controller_port: u16,
    child: Option<Child>,
}

impl KafkaBroker {
    pub fn start() -> KafkaBroker {
        let dir = std::env::temp_dir().join(unique_name("relay_kafka"));
        std::fs::create_dir_all(dir.join("data")).expect("broker dir");
        let (port, controller_port) = (free_port(), free_port());
        let props = format!(
            "process.roles=broker,controller\nnode.id=1\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\ncontroller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}\n\
             inter.broker.listener.name=PLAINTEXT\nlog.dirs={}\nnum.partitions=1\n\
             offsets.topic.replication.factor=1\noffsets.topic.num.partitions=2\n\
             transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=2\ngroup.initial.rebalance.delay.ms=0\n\
             share.coordinator.state.topic.replication.factor=1\nshare.coordinator.state.topic.min.isr=1\n",
            dir.join("data").display()
        );
        std::fs::write(dir.join("server.properties"), props).expect("server.properties");
        let mut b = KafkaBroker {
            dir,
            port,
            controller_port,
            child: None,
        };
        let cluster_id = base64url(&rand::random::<[u8; 16]>());
        let out = b
            .java()
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                &cluster_id,
                "-c",
            ])
            .arg(b.dir.join("server.properties"))
            .output()
            .expect("run StorageTool");
        assert!(
            out.status.success(),
            "format: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        b.launch();
        b
    }

    fn java(&self) -> Command {
        let libs = env_or("STACK_KAFKA_LIBS", "");
        assert!(
            !libs.is_empty(),
            "STACK_KAFKA_LIBS unset: run the tests through scripts/test"
        );
        let mut c = Command::new("java");
        c.arg("-Xms128m")
            .arg("-Xmx512m")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                env_or("STACK_KAFKA_LOG4J", "")
            ))
            .arg("-cp")
            .arg(format!("{libs}/*"));
        c
    }

    fn launch(&mut self) {
        let log = self.dir.join("kafka.log");
        let _ = std::fs::write(&log, "");
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("log");
        let child = self
            .java()
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(Stdio::from(out.try_clone().expect("log fd")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn kafka");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Kafka Server started") {
                return;
            }
            assert!(Instant::now() < deadline, "broker did not start: {text}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM, a controlled shutdown) and starts it again on the same data.
    pub fn restart(&mut self) {
        self.stop();
        let _ = self.controller_port;
        self.launch();
    }

    /// Starts a stopped broker again on the same data.
    pub fn start_again(&mut self) {
        self.launch();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A `relay` process started by a test, its log in a file.
pub struct RelayProc {
    child: Option<Child>,
    pub log: PathBuf,
}

/// The environment of a relay process: `RELAY_*` settings.
#[derive(Clone, Debug, Default)]
pub struct RelayEnv {
    pub vars: Vec<(String, String)>,
}

impl RelayEnv {
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_owned(), value.into()));
        self
    }
}

impl RelayProc {
    pub fn spawn(args: &[&str], env: &RelayEnv) -> RelayProc {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("relay")));
        let out = std::fs::File::create(&log).expect("relay log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
        cmd.args(args)
            .env_remove("RUST_LOG")
            .env("RELAY_LOG__FORMAT", "json")
            .env("RELAY_LOG__LEVEL", "info")
            .stdout(Stdio::from(out.try_clone().expect("log fd")))
            .stderr(Stdio::from(out));
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn relay");
        RelayProc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends `sig` (`TERM`, `INT`...) without waiting for anything.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c.id(), sig);
        }
    }

    /// SIGKILL: the relay gets no chance to finish anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        signal(c.id(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself (it is killed after that).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        None
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Unpadded base64url, the form of Kafka's cluster ids.
fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}
