//! Starting a child process of this executable and ending it: spawn, mark, reap.
//!
//! Pool workers are started here, and so will be any other child that runs a task
//! (`Process`). The child is `/proc/self/exe` started again with one marker argument;
//! [`prepare_child`] is the first thing it does.

use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Environment variable set in every worker: a cheap hint that `init` should look at
/// the command line. Programs a task starts inherit it, so it proves nothing alone.
pub(crate) const WORKER_ENV: &str = "MULTIPROC_WORKER";

/// Prefix of the command-line argument that makes a process a worker:
/// `--multiproc-worker=index:parent pid:server`. Arguments are not inherited, so a
/// program started by a task is never mistaken for a worker.
pub(crate) const WORKER_ARG: &str = "--multiproc-worker=";

/// Environment variable carrying a worker's memory limit in bytes (`RLIMIT_AS`).
pub(crate) const MEMORY_LIMIT_ENV: &str = "MULTIPROC_WORKER_MEMORY_LIMIT";

/// Environment variable set, for the test-only fault injection
/// ([`SpawnOptions::announce_parent_pid`]), in the one worker that is to announce its
/// parent's pid instead of its own at the handshake.
pub(crate) const ANNOUNCE_PARENT_PID_ENV: &str = "MULTIPROC_WORKER_ANNOUNCE_PARENT_PID";

/// Exit code of a worker that could not start serving (EX_SOFTWARE).
pub(crate) const START_FAILED: i32 = 70;

/// How a child is started.
#[derive(Debug, Clone)]
pub(crate) struct SpawnOptions {
    /// Whether the child writes to this process's stdout and stderr, or to /dev/null.
    pub(crate) inherit_output: bool,
    /// Pipes the child writes its stdout and stderr to instead, when this process
    /// relays them (so they do not write over a progress bar).
    pub(crate) relay: Option<Arc<RelayWriters>>,
    /// The child's address-space limit in bytes, if any.
    pub(crate) memory_limit: Option<u64>,
    /// Test-only fault injection: the worker started with this index announces its
    /// parent's pid instead of its own at the handshake, so the parent's check of the
    /// pid against the child it started must refuse it.
    pub(crate) announce_parent_pid: Option<usize>,
    /// Another program to start instead of this executable: only for testing how
    /// start-up failures are reported.
    #[cfg(test)]
    pub(crate) program: Option<PathBuf>,
}

/// The write ends of the pipes a pool's workers write their output to.
#[derive(Debug)]
pub(crate) struct RelayWriters {
    pub(crate) out: std::io::PipeWriter,
    pub(crate) err: std::io::PipeWriter,
}

/// Asks a spawner thread to start this executable as worker `index`, connecting
/// back to the one-shot server `server`. The answer arrives on the returned channel.
pub(crate) fn launch(
    index: usize,
    server: &str,
    options: &SpawnOptions,
) -> io::Result<mpsc::Receiver<io::Result<Child>>> {
    let parent = std::process::id();
    // `/proc/self/exe` is this very executable even if its file was replaced since.
    let exe = PathBuf::from("/proc/self/exe");
    #[cfg(test)]
    let exe = options.program.clone().unwrap_or(exe);
    let mut command = Command::new(exe);
    if let Some(arg0) = std::env::args_os().next() {
        command.arg0(arg0);
    }
    command
        .arg(format!("{WORKER_ARG}{index}:{parent}:{server}"))
        .env(WORKER_ENV, "1")
        .stdin(Stdio::null());
    if !options.inherit_output {
        command.stdout(Stdio::null()).stderr(Stdio::null());
    } else if let Some(relay) = &options.relay {
        command
            .stdout(Stdio::from(relay.out.try_clone()?))
            .stderr(Stdio::from(relay.err.try_clone()?));
    }
    if let Some(limit) = options.memory_limit {
        command.env(MEMORY_LIMIT_ENV, limit.to_string());
    }
    if options.announce_parent_pid == Some(index) {
        command.env(ANNOUNCE_PARENT_PID_ENV, "1");
    } else {
        // Not inherited from this process's environment: only the hook sets it.
        command.env_remove(ANNOUNCE_PARENT_PID_ENV);
    }
    spawn_from_owner_thread(command)
}

/// Waits for the answer to a [`launch`], at most `timeout`. A child that starts
/// after the wait gave up is killed and reaped when it does (see [`reap_late`]),
/// so no zombie is left for the life of the process.
pub(crate) fn wait_spawned(
    spawned: mpsc::Receiver<io::Result<Child>>,
    timeout: Duration,
) -> io::Result<Child> {
    match spawned.recv_timeout(timeout) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // The spawner thread may still start it: whoever gets it must reap it.
            let _ = reap_late(spawned);
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the spawner thread did not start the process within {timeout:?}"),
            ))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(io::Error::other("the spawner thread stopped"))
        }
    }
}

/// Kills and reaps the child a [`launch`] starts after its requester gave up, on a
/// thread of its own; the thread returns the reaped child's pid (`None` when the
/// spawn failed). A failure to start the thread leaves the work to the spawner
/// thread, which kills and reaps a child nobody receives.
pub(crate) fn reap_late(
    spawned: mpsc::Receiver<io::Result<Child>>,
) -> Option<thread::JoinHandle<Option<u32>>> {
    thread::Builder::new()
        .name("multiproc-reaper".into())
        .spawn(move || {
            let mut child = spawned.recv().ok()?.ok()?;
            let _ = child.kill();
            let _ = child.wait();
            Some(child.id())
        })
        .ok()
}

/// Asks the kernel to kill this child when its parent dies, ignores SIGPIPE, then
/// checks that the parent has not died already. Called first thing in a child.
/// Returns the pid the child announces to its parent at the handshake: its own,
/// or its parent's under the test-only fault of
/// [`SpawnOptions::announce_parent_pid`].
///
/// Setting it in the child rather than between fork and exec lets the parent spawn
/// with `posix_spawn` (no `pre_exec` hook), which on a large parent is several times
/// faster than `fork`. The signal is tied to the thread that spawned the child, one
/// of the spawner threads below, which live as long as the process.
pub(crate) fn prepare_child(parent: u32) -> io::Result<u32> {
    // SAFETY: `prctl(PR_SET_PDEATHSIG, SIGKILL)` only sets a flag on this process;
    // it reads and writes no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setting the disposition of SIGPIPE to "ignore" installs no handler code.
    // A worker started from the test-support constructor runs before Rust's runtime
    // would have done the same, and a task writing to a closed pipe should get an
    // error, not kill its worker.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // A terminal's Ctrl-C goes to its foreground process group: in a group of its
    // own, with SIGINT ignored, a worker leaves Ctrl-C to its parent, which decides
    // (see `PoolBuilder::interrupt_on_ctrl_c`).
    // SAFETY: `setpgid(0, 0)` moves this process into a new group of its own; it
    // touches no memory of ours.
    unsafe {
        libc::setpgid(0, 0);
    }
    // SAFETY: setting the disposition of SIGINT to "ignore" installs no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    if let Some(limit) = std::env::var(MEMORY_LIMIT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let limit = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: `limit` is a valid `rlimit` for the call to read.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &raw const limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Programs this worker starts are not held to it.
        // SAFETY: called while this process is single-threaded (first thing in a
        // worker, before any thread is started), so no other thread reads the
        // environment concurrently.
        unsafe { std::env::remove_var(MEMORY_LIMIT_ENV) };
    }
    let announced = match std::env::var_os(ANNOUNCE_PARENT_PID_ENV) {
        None => std::process::id(),
        Some(_) => {
            // Workers of a pool this one starts announce their own pid.
            // SAFETY: called while this process is single-threaded (first thing in
            // a worker, before any thread is started), so no other thread reads
            // the environment concurrently.
            unsafe { std::env::remove_var(ANNOUNCE_PARENT_PID_ENV) };
            parent
        }
    };
    // The parent may have died before the flag was set: then nobody waits for us.
    if std::os::unix::process::parent_id() != parent {
        return Err(io::Error::other(
            "the parent exited while this worker started",
        ));
    }
    Ok(announced)
}

/// Waits up to `grace` for the child to exit, then kills it; always reaps it.
///
/// `None` when the status cannot be had: someone else reaped the child (a
/// `waitpid(-1)` elsewhere in the program, or `SIGCHLD` set to be ignored).
pub(crate) fn reap(mut child: Child, grace: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + grace;
    let mut pause = Duration::from_micros(50);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            Ok(None) => break,
            Err(_) => return None,
        }
    }
    // Ignored error: the child exited between try_wait and kill.
    let _ = child.kill();
    // `wait` retries on EINTR itself.
    child.wait().ok()
}

/// Sends `signal` to process `pid`. The caller makes sure `pid` is still its own
/// unreaped child (so the number cannot have been reused).
pub(crate) fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "process id out of range"))?;
    // SAFETY: `kill` only asks the kernel to deliver a signal; it reads and writes no
    // memory of ours. A positive pid names exactly one process, never a group.
    if pid <= 0 || unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Long-lived threads that spawn children, so several can start at once.
const SPAWNER_THREADS: usize = 4;

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Asks one of a few long-lived threads to spawn `command`; the answer arrives on
/// the returned channel.
///
/// Linux delivers the parent-death signal when the *thread* that spawned a child
/// exits, not the process, so workers must never be spawned from a thread that may
/// end first (a test thread, a scoped thread, a rayon worker). `posix_spawn` blocks
/// its thread until the child has called `exec`, hence more than one such thread.
/// A failure to start those threads is returned and tried again on the next call.
fn spawn_from_owner_thread(command: Command) -> io::Result<mpsc::Receiver<io::Result<Child>>> {
    static OWNERS: Mutex<Option<mpsc::Sender<SpawnJob>>> = Mutex::new(None);
    let mut owners = OWNERS.lock().unwrap_or_else(|p| p.into_inner());
    if owners.is_none() {
        *owners = Some(start_spawners()?);
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = owners
        .as_ref()
        .expect("set just above")
        .send((command, reply_tx));
    if let Err(mpsc::SendError((command, reply_tx))) = sent {
        // Every spawner thread has gone (they only end when their queue closes, so
        // this does not happen in practice): start new ones and try once more.
        let fresh = start_spawners()?;
        fresh
            .send((command, reply_tx))
            .map_err(|_| io::Error::other("spawner threads have stopped"))?;
        *owners = Some(fresh);
    }
    Ok(reply_rx)
}

fn start_spawners() -> io::Result<mpsc::Sender<SpawnJob>> {
    let (tx, rx) = mpsc::channel::<SpawnJob>();
    let jobs = Arc::new(Mutex::new(rx));
    let mut started = 0;
    let mut last_error = None;
    for i in 0..SPAWNER_THREADS {
        let jobs = Arc::clone(&jobs);
        let spawned = thread::Builder::new()
            .name(format!("multiproc-spawner-{i}"))
            .spawn(move || {
                loop {
                    let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((mut command, reply)) = job else {
                        return;
                    };
                    // A requester that gave up no longer receives: the child is
                    // then killed and reaped here, never left a zombie.
                    if let Err(mpsc::SendError(Ok(mut child))) = reply.send(command.spawn()) {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => last_error = Some(e),
        }
    }
    match (started, last_error) {
        (0, Some(e)) => Err(io::Error::new(
            e.kind(),
            format!("could not start a spawner thread: {e}"),
        )),
        _ => Ok(tx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_started_after_its_requester_gave_up_is_reaped() {
        let options = SpawnOptions {
            inherit_output: false,
            relay: None,
            memory_limit: None,
            announce_parent_pid: None,
            // Any program will do: it is killed as soon as it starts.
            program: Some(PathBuf::from("/bin/sleep")),
        };
        let spawned = launch(0, "unused", &options).expect("asked for");
        let reaper = reap_late(spawned).expect("a reaper thread");
        let pid = reaper.join().expect("no panic").expect("started");
        // Reaped, not a zombie: its /proc entry is gone.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
