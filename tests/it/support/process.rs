//! The process runner: the real `clerkgate` binary as an operator runs it. Every child gets a
//! cleared environment (plus `PATH` and what the test passes), so a `CLERK_*` or `CLERKGATE_*`
//! variable on the test machine cannot change the outcome and no test has to touch this
//! process's environment; every wait on a child is bounded; a child is killed and reaped when
//! its guard drops, so a failing test leaves no process behind.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
