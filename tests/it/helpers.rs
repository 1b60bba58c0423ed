//! Helper processes some tests need: this test binary run again in a helper role.
//!
//! The role is chosen by an environment variable and run by a constructor before the
//! test harness starts, the way `enable_test_support!()` runs workers; the process
//! exits when the role is done. A helper is therefore never a `#[test]`: it cannot
//! be listed, filtered, counted as passed, or run by `cargo test -- --ignored`.

use std::ffi::OsStr;
use std::process::Command;

use multiproc::Pool;

use crate::support::pool;

/// Environment variable naming the role: `orphan`, or `nested:<n>`.
const HELPER_ROLE: &str = "MULTIPROC_TEST_HELPER_ROLE";

/// Plays `role` in a helper process and returns what it printed on stdout,
/// trimmed; a helper that fails fails the test with its stderr.
pub(crate) fn run_alone(role: &str) -> String {
    let out = helper_command(role).output().expect("the helper ran");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// This test binary, set to play `role` instead of running tests.
pub(crate) fn helper_command(role: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
    command.env(HELPER_ROLE, role);
    command
}

// SAFETY: the loader calls each `.init_array` entry once, before `main`, as
// `fn(argc, argv, envp)`; an `extern "C" fn()` that ignores its arguments is called
// correctly that way on every Linux ABI. Outside a helper it reads one environment
// variable and returns; in a helper it catches every panic, so none unwinds out of
// this C-ABI function, and exits the process.
#[used]
#[unsafe(link_section = ".init_array")]
static HELPER_HOOK: extern "C" fn() = {
    extern "C" fn run_helper_role() {
        let Some(role) = std::env::var_os(HELPER_ROLE) else {
            return;
        };
        // A helper's own workers inherit the variable: let them serve first.
        multiproc::init();
        let code = match std::panic::catch_unwind(|| play(&role)) {
            Ok(()) => 0,
            Err(_) => 101,
        };
        std::process::exit(code);
    }
    run_helper_role
};

fn play(role: &OsStr) {
    let role = role.to_str().expect("a helper role is text");
    if role == "orphan" {
        orphan();
    } else if role == "shared" {
        crate::shared::helper_shared();
    } else if role == "interrupt" {
        interrupted();
    } else if role == "channels" {
        crate::pipe::channels_leave_nothing_behind();
    } else if role == "refused-pid" {
        crate::hardening::helper_refused_pid();
    } else if role == "progress-asked" {
        crate::insights::helper_progress(true);
    } else if role == "logs" {
        crate::insights::helper_logs();
    } else if role == "progress-printing" {
        crate::insights::helper_progress_printing();
    } else if role == "progress-unasked" {
        crate::insights::helper_progress(false);
    } else if role == "checkpointed-map" {
        crate::checkpoint::helper_checkpointed_map();
    } else if role == "checkpointed-pipeline" {
        crate::checkpoint::helper_checkpointed_pipeline();
    } else if role == "recycled" {
        crate::jobs::helper_recycled();
    } else if role == "pool-size" {
        pool_size(Pool::builder());
    } else if role == "pool-size-two" {
        pool_size(Pool::builder().workers(2));
    } else if let Some(n) = role.strip_prefix("nested:") {
        nested(n.parse().expect("nested:<n> takes a number"));
    } else {
        panic!("unknown helper role {role:?}");
    }
}

/// For the configuration tests: builds a pool the way the program would and says
/// how many workers it got and how many of them are processes (none inline), or
/// why it could not.
fn pool_size(builder: multiproc::PoolBuilder) {
    match builder.inherit_output(false).build() {
        Ok(pool) => println!(
            "workers={} processes={}",
            pool.workers(),
            pool.worker_pids().unwrap().len()
        ),
        Err(e) => println!("error: {e}"),
    }
}

/// The line a `pool-size` helper printed, run with `envs` (and under `taskset -c
/// 0` when `one_cpu`).
fn pool_size_with(role: &str, envs: &[(&str, &str)], one_cpu: bool) -> String {
    let mut command = if one_cpu {
        let mut taskset = Command::new("taskset");
        taskset.args(["-c", "0"]);
        taskset.arg(std::env::current_exe().expect("the test binary's path"));
        taskset.env(HELPER_ROLE, role);
        taskset
    } else {
        helper_command(role)
    };
    command.env_remove("MULTIPROC_WORKERS");
    command.env_remove("MULTIPROC_BACKEND");
    command.envs(envs.iter().copied());
    let output = command.output().expect("the helper ran");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .expect("text")
        .trim()
        .to_owned()
}

#[test]
fn the_worker_count_follows_the_environment_and_the_cpus_this_process_may_use() {
    assert_eq!(
        pool_size_with("pool-size", &[("MULTIPROC_WORKERS", "3")], false),
        "workers=3 processes=3"
    );
    // A count set by the program wins over the variable.
    assert_eq!(
        pool_size_with("pool-size-two", &[("MULTIPROC_WORKERS", "3")], false),
        "workers=2 processes=2"
    );
    // An affinity mask of one CPU gives one worker.
    assert_eq!(
        pool_size_with("pool-size", &[], true),
        "workers=1 processes=1"
    );
    // And the variable wins over the CPUs.
    assert_eq!(
        pool_size_with("pool-size", &[("MULTIPROC_WORKERS", "2")], true),
        "workers=2 processes=2"
    );
}

#[test]
fn the_backend_and_bad_values_come_from_the_environment_with_clear_errors() {
    assert_eq!(
        pool_size_with("pool-size-two", &[("MULTIPROC_BACKEND", "inline")], false),
        "workers=2 processes=0"
    );
    assert_eq!(
        pool_size_with("pool-size", &[("MULTIPROC_WORKERS", "0")], false),
        "error: MULTIPROC_WORKERS=\"0\" is not a number of workers, at least 1"
    );
    assert_eq!(
        pool_size_with("pool-size", &[("MULTIPROC_BACKEND", "threads")], false),
        "error: MULTIPROC_BACKEND=\"threads\" is not `process`, `inline` or `mpi`"
    );
    // Asking for MPI in a build without it says what is missing; with it, a program
    // that is not an MPI job runs its workers here.
    let mpi = pool_size_with("pool-size-two", &[("MULTIPROC_BACKEND", "mpi")], false);
    if cfg!(feature = "mpi") {
        assert_eq!(mpi, "workers=2 processes=2");
    } else {
        assert_eq!(
            mpi,
            "error: invalid pool configuration: the MPI backend needs multiproc built with its \
             `mpi` feature"
        );
    }
}

/// For `workers_exit_when_their_parent_is_killed`: starts a pool, reports its
/// workers, and has both run a task that never returns, so they are not reading
/// their channels when the test kills this process.
fn orphan() {
    // Workers inherit stdout, so their line reaches the test through our pipe.
    let pool = Pool::builder().workers(2).chunk_size(1).build().unwrap();
    let pids: Vec<String> = pool
        .worker_pids()
        .unwrap()
        .iter()
        .map(u32::to_string)
        .collect();
    println!("worker pids: {}", pids.join(" "));
    let _ = pool.map(0..2u64, |x| -> u64 {
        println!("stuck in a task");
        loop {
            std::thread::park();
            if x > 2 {
                return x;
            }
        }
    });
}

/// For `ctrl_c_stops_a_call_and_its_workers`: a long call on a pool that handles
/// Ctrl-C; reports its workers, says when the call runs, then how it ended.
fn interrupted() {
    use std::io::Write;
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .interrupt_on_ctrl_c(true)
        .inherit_output(false)
        .build()
        .unwrap();
    let pids: Vec<String> = pool
        .worker_pids()
        .unwrap()
        .iter()
        .map(u32::to_string)
        .collect();
    println!("worker pids: {}", pids.join(" "));
    // The input says when the call is under way (the handler is installed by then).
    let items = (0..100_000u64).inspect(|&x| {
        if x == 20 {
            println!("running");
            std::io::stdout().flush().unwrap();
        }
    });
    let outcome = pool.map(items, |x: u64| {
        std::thread::sleep(std::time::Duration::from_millis(5));
        x
    });
    match outcome {
        Err(multiproc::Error::Interrupted { done }) => println!("interrupted after {done}"),
        Err(other) => println!("failed: {other}"),
        Ok(v) => println!("finished {} items", v.len()),
    }
    std::io::stdout().flush().unwrap();
    // The pool is usable afterwards.
    let again = pool.map(0..3u64, |x| x + 1).unwrap();
    println!("then: {again:?}");
}

/// For `a_program_started_by_a_task_is_not_taken_for_a_worker`: an ordinary program,
/// started from inside a worker, that uses multiproc itself.
fn nested(n: u64) {
    let pool = pool(2);
    let sum: u64 = pool.map_reduce(0..n, |x| x, || 0, |a, b| a + b).unwrap();
    println!("nested sum: {sum}");
}

#[test]
fn ctrl_c_stops_a_call_and_its_workers() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let mut helper = helper_command("interrupt")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let helper_pid = helper.id();
    // Hang guard: a stalled helper is killed, so the reads below end.
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if watchdog
            .recv_timeout(std::time::Duration::from_secs(60))
            .is_err()
        {
            // SAFETY: sending a signal has no memory effects in this process.
            unsafe { libc::kill(helper_pid as i32, libc::SIGKILL) };
        }
    });
    let mut lines = BufReader::new(helper.stdout.take().unwrap())
        .lines()
        .map(|l| l.unwrap());
    let pids: Vec<u32> = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("worker pids:").map(str::to_owned))
        .expect("the helper reports its workers")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(lines.by_ref().any(|l| l == "running"), "the call started");
    // SAFETY: sending a signal has no memory effects in this process.
    unsafe { libc::kill(helper_pid as i32, libc::SIGINT) };
    let ended = lines.next().expect("the helper says how the call ended");
    assert!(ended.starts_with("interrupted after "), "{ended}");
    let then = lines.next().expect("the pool answers after the interrupt");
    assert_eq!(then, "then: [1, 2, 3]");
    let status = helper.wait().unwrap();
    let _ = done.send(());
    guard.join().unwrap();
    assert!(status.success(), "{status}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} left"
        );
    }
}

#[test]
fn helpers_are_not_listed_as_tests() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--list", "--ignored"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("soak::"), "the listing works: {listed}");
    assert!(!listed.contains("helper"), "a helper is listed: {listed}");
}
