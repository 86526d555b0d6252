//! The process runner: the real `clerkgate` binary as an operator runs it. Every child gets a
//! cleared environment (plus `PATH` and what the test passes), so a `CLERK_*` or `CLERKGATE_*`
//! variable on the test machine cannot change the outcome and no test has to touch this
//! process's environment; every wait on a child is bounded; a child is killed and reaped when
//! its guard drops, so a failing test leaves no process behind.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{eventually, http};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_clerkgate");

/// Upper bound for any one wait on a child.
pub const CHILD_WAIT: Duration = Duration::from_secs(20);

/// `clerkgate <args>` with a cleared environment plus `PATH` and `env`.
pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().stdin(Stdio::null());
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Kills and reaps the child when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a child ended and what it printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> i32 {
        self.status.code().expect("exited, not killed by a signal")
    }
}

/// Runs `clerkgate <args>` to completion within [`CHILD_WAIT`].
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut child = Running(
        command(args, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn clerkgate"),
    );
    // Read both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.0.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.0.stderr.take().unwrap()));
    let deadline = Instant::now() + CHILD_WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "clerkgate {args:?} did not exit within {CHILD_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// A file in a directory of its own under the system temp dir, both removed when dropped.
pub struct TempFile(std::path::PathBuf);

impl TempFile {
    pub fn with(name: &str, contents: &str) -> TempFile {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("clerkgate-it-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `clerkgate serve` running as a child: its proxy and admin addresses (from the JSON
/// "clerkgate listening" log line, so the config can bind port 0) and every stderr line.
/// Killed and reaped when dropped.
pub struct Served {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _config: TempFile,
}

impl Served {
    /// Starts `serve` with this configuration (which must log JSON) and extra environment,
    /// and waits for the line that names the bound ports. Not necessarily ready yet.
    pub fn start(toml: &str, env: &[(&str, &str)]) -> Served {
        let config = TempFile::with("clerkgate.toml", toml);
        let mut child = command(&["--config", config.path(), "serve"], env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn clerkgate");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addrs) = listening(&line) {
                    let _ = tx.send(addrs);
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let Ok((proxy, admin)) = rx.recv_timeout(CHILD_WAIT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no 'clerkgate listening' line; log: {:?}", log.lock());
        };
        Served {
            child,
            proxy,
            admin,
            log,
            _config: config,
        }
    }

    /// Every stderr line so far, for failure messages.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}", self.child.id());
    }

    /// Waits up to `within` for the process to exit.
    pub async fn exited(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut status = None;
        eventually(within, async || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        })
        .await;
        status
    }

    /// Status of GET /readyz (`None` when the admin listener does not answer).
    pub async fn readyz(&self) -> Option<u16> {
        http()
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy and admin addresses from the JSON "clerkgate listening" line.
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["message"] != "clerkgate listening" {
        return None;
    }
    let addr = |field: &str| -> Option<SocketAddr> {
        v[field]
            .as_str()?
            .strip_prefix("Some(")?
            .strip_suffix(')')?
            .parse()
            .ok()
    };
    Some((addr("proxy")?, addr("admin")?))
}
