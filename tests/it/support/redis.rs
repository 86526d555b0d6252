//! A real `redis-server` (Debian package) on a free loopback port with its own temp dir, no
//! persistence, owned by one test: it can be killed, paused (SIGSTOP), resumed and restarted
//! empty on the same port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// The `redis-server` binary, or why there is none (the caller prints `SKIP: <why>`).
pub fn binary() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("CLERKGATE_TEST_REDIS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let path = PathBuf::from(dir).join("redis-server");
        if path.exists() {
            return Ok(path);
        }
    }
    Err("redis-server not installed (apt-get install redis-server; .ci/fleet-deps does it)".into())
}

impl RedisServer {
    /// Starts a server, or returns why it cannot (no binary).
    pub async fn start() -> Result<RedisServer, String> {
        let bin = binary()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "clerkgate-redis-{}-{port}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        let mut server = RedisServer {
            port,
            dir,
            child: None,
        };
        server.spawn(&bin).await;
        Ok(server)
    }

    /// Starts the server on `self.port`; if that port was taken meanwhile (it was free when
    /// chosen, but another test may bind it first), moves to another free port.
    async fn spawn(&mut self, bin: &std::path::Path) {
        for _ in 0..5 {
            if self.try_spawn(bin).await {
                return;
            }
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            self.port = l.local_addr().expect("addr").port();
        }
        panic!("redis-server did not start on a free port");
    }

    /// Whether the server came up (and is still running) on `self.port`.
    async fn try_spawn(&mut self, bin: &std::path::Path) -> bool {
        let child = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let up = super::eventually(Duration::from_secs(10), async || {
            tokio::net::TcpStream::connect(&addr).await.is_ok()
        })
        .await;
        // A server that lost the port race exits; whatever answers then is not ours.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        up && running
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    /// SIGKILL: connections drop, data is gone (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again, empty, on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn(&binary().expect("binary")).await;
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn pause(&self) {
        let _ = Command::new("kill").args(["-STOP", &self.pid()]).status();
    }

    pub fn resume(&self) {
        let _ = Command::new("kill").args(["-CONT", &self.pid()]).status();
    }

    /// A command through `redis-cli`-free raw RESP (for assertions on what Redis holds).
    pub async fn command(&self, args: &[&str]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect redis");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("redis answers")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
