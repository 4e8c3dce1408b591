//! A `redis-server` of a test's own, for tests that stop, restart or reconfigure their server
//! (the shared one on `REDIS_URL` serves every other test).

use fred::interfaces::ClientLike;
use fred::prelude::{Builder, Config};
use fred::types::{ClusterHash, CustomCommand, Value};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// The log files of this test's `redis-server`s: printed if the test fails (a panic, or the
/// time limit), removed if it passes.
pub(crate) struct Logs(Vec<PathBuf>);

impl Logs {
    /// A new, empty log file for a server on `port`, named after the test id.
    pub(crate) fn create(&mut self, id: &str, port: u16) -> std::io::Result<File> {
        let path = std::env::temp_dir().join(format!("{id}-redis-{port}-{}.log", self.0.len()));
        let file = File::create(&path)?;
        self.0.push(path);
        Ok(file)
    }

    fn dump(&self) -> String {
        self.0
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
                format!("--- {} ---\n{text}", path.display())
            })
            .collect()
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the redis-server logs of this test:\n{}", self.dump());
        } else {
            for path in &self.0 {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A `redis-server` of this test's own, killed when dropped, logging to a file of `Logs`.
pub(crate) struct Server {
    pub(crate) port: u16,
    child: Option<Child>,
}

impl Server {
    pub(crate) fn start(port: u16, log: File) -> std::io::Result<Server> {
        Self::start_with(port, log, &[])
    }

    /// [`start`](Self::start) with `extra` arguments for `redis-server`.
    pub(crate) fn start_with(port: u16, log: File, extra: &[&str]) -> std::io::Result<Server> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // A replica stores what it syncs from its primary: in the temporary
                // directory, a file per server, not in the crate's directory.
                "--dir",
                &std::env::temp_dir().to_string_lossy(),
                "--dbfilename",
                &format!("cqrs-test-redis-{port}.rdb"),
                // Read only with `--cluster-enabled yes`: one per server, in the temporary
                // directory too.
                "--cluster-config-file",
                &std::env::temp_dir()
                    .join(format!("cqrs-test-redis-{port}-nodes.conf"))
                    .to_string_lossy(),
            ])
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Server {
            port,
            child: Some(child),
        })
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            for file in [
                format!("cqrs-test-redis-{}.rdb", self.port),
                format!("cqrs-test-redis-{}-nodes.conf", self.port),
            ] {
                let _ = std::fs::remove_file(std::env::temp_dir().join(file));
            }
        }
    }

    /// A client of this server's own, connected, for the test's admin commands.
    pub(crate) async fn admin(&self) -> fred::clients::Client {
        let client = Builder::from_config(Config::from_url(&self.url()).expect("a redis url"))
            .build()
            .expect("a client");
        client.init().await.expect("connect the admin client");
        client
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits until the server on the port is this one: `INFO server` answers with this
    /// child's `process_id` (not merely something listening: the port was free when picked,
    /// and another process may have taken it since). `Err` when the child exited (say, the
    /// port was taken) or did not answer within 10 s.
    pub(crate) async fn wait_until_up(&mut self) -> Result<(), String> {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        let url = self.url();
        loop {
            let child = self.child.as_mut().expect("a running server");
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!(
                    "redis-server on port {} exited: {status}",
                    self.port
                ));
            }
            let pid = child.id();
            if process_id(&url).await == Some(pid) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                return Err(format!(
                    "redis-server (pid {pid}) did not answer on port {} within 10 s",
                    self.port
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `process_id` that `INFO server` reports at `url`, if a Redis answers there.
async fn process_id(url: &str) -> Option<u32> {
    let mut builder = Builder::from_config(Config::from_url(url).ok()?);
    builder.with_connection_config(|c| c.connection_timeout = Duration::from_secs(1));
    builder.with_performance_config(|c| c.default_command_timeout = Duration::from_secs(1));
    let client = builder.build().ok()?;
    client.init().await.ok()?;
    let info: Option<String> = client
        .custom(
            CustomCommand::new("INFO", ClusterHash::FirstKey, false),
            vec![Value::from("server")],
        )
        .await
        .ok();
    let _ = client.quit().await;
    info?
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

impl Logs {
    /// No log files yet.
    pub(crate) fn new() -> Logs {
        Logs(Vec::new())
    }
}

impl Server {
    /// A server of the test's own on a free port, up and answering. `None` (after saying why)
    /// when `redis-server` cannot run here and `CQRS_REQUIRE_SERVICES` is not `1`.
    pub(crate) async fn start_free(id: &str, logs: &mut Logs) -> Option<Server> {
        Self::start_free_with(id, logs, &[]).await
    }

    /// [`start_free`](Self::start_free) with `extra` arguments for `redis-server`.
    pub(crate) async fn start_free_with(
        id: &str,
        logs: &mut Logs,
        extra: &[&str],
    ) -> Option<Server> {
        // A port free when picked may be taken before redis-server binds it: then the server
        // exits, and another port is tried.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = free_port();
            let log = logs.create(id, port).expect("create the server's log file");
            let mut server = match Server::start_with(port, log, extra) {
                Ok(server) => server,
                Err(e) => {
                    let required = std::env::var("CQRS_REQUIRE_SERVICES").as_deref() == Ok("1");
                    assert!(!required, "redis-server could not start: {e}");
                    eprintln!("skipping: redis-server could not start: {e}");
                    return None;
                }
            };
            match server.wait_until_up().await {
                Ok(()) => return Some(server),
                Err(e) if attempts < 3 => eprintln!("{e}; trying another port"),
                Err(e) => panic!("{e}"),
            }
        }
    }
}
