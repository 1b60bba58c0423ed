//! The same jobs as an MPI job: each test runs this binary under `mpirun` in a role
//! and compares what rank 0 printed with the same role run on one machine.
//!
//! MPI initialises once per process, so every check is its own `mpirun` run. Needs
//! Open MPI's `mpirun` (Debian: `openmpi-bin`) and the crate feature `mpi`.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use multiproc::{Backend, Pipeline, Pool, SharedSlice};

/// Environment variable naming the role this binary plays instead of running tests.
const ROLE: &str = "MULTIPROC_TEST_MPI_ROLE";

// SAFETY: the loader calls each `.init_array` entry once, before `main`, as
// `fn(argc, argv, envp)`; an `extern "C" fn()` that ignores its arguments is called
// correctly that way on every Linux ABI. Outside a role it reads one environment
// variable and returns; in a role it catches every panic, so none unwinds out of
// this C-ABI function, and exits the process.
#[used]
#[unsafe(link_section = ".init_array")]
static ROLE_HOOK: extern "C" fn() = {
    extern "C" fn play_role() {
        let Some(role) = std::env::var_os(ROLE) else {
            return;
        };
        // Workers serve and serving ranks serve here; rank 0 (or a run without a
        // launcher) goes on to play the role.
        multiproc::init();
        let code = match std::panic::catch_unwind(|| play(&role)) {
            Ok(()) => 0,
            Err(_) => 101,
        };
        std::process::exit(code);
    }
    play_role
};

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn play(role: &OsStr) {
    let role = role.to_str().expect("a role is text");
    match role {
        "par_map" => {
            let squares = multiproc::par_map(0..1_000u64, |x| x * x).unwrap();
            println!("{} {:?}", squares.len(), &squares[995..]);
        }
        "map_reduce" => {
            let pool = Pool::builder().build().unwrap();
            let sum = pool
                .map_reduce(0..200_000u64, splitmix64, || 0, u64::wrapping_add)
                .unwrap();
            println!("{sum}");
        }
        "map_with_shared" => {
            let pool = Pool::builder().workers(3).build().unwrap();
            let table = SharedSlice::from_iter((0..10_000u64).map(splitmix64)).unwrap();
            let picked = pool
                .map_with(0..50usize, &table, |t, i| t[i * 199] % 1_000)
                .unwrap();
            println!("{picked:?}");
        }
        "imap" => {
            let pool = Pool::builder().workers(3).chunk_size(7).build().unwrap();
            let out: Vec<u64> = pool
                .imap(0..500u64, splitmix64)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            println!("{} {}", out.len(), out.iter().fold(0, |a, b| a ^ b));
        }
        "apply_async" => {
            let pool = Pool::builder().workers(2).build().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let handles: Vec<_> = (0..6u64)
                .map(|i| {
                    let tx = tx.clone();
                    pool.apply_async_with_callback(
                        |x: u64| x * 10 + 1,
                        i,
                        move |v: &u64| tx.send(*v).unwrap(),
                        |e| panic!("{e}"),
                    )
                    .unwrap()
                })
                .collect();
            let results: Vec<u64> = handles.into_iter().map(|h| h.get().unwrap()).collect();
            drop(tx);
            let mut called: Vec<u64> = rx.iter().collect();
            called.sort_unstable();
            println!("{results:?} {called:?}");
        }
        "pipeline" => {
            let total = Pipeline::new(0..5_000u64)
                .stage(2, |x: u64| splitmix64(x) % 1_000)
                .fold_stage(2, || 0u64, |acc, x| acc + x)
                .reduce(|| 0, |a, b| a + b)
                .unwrap();
            println!("{total}");
        }
        "panic" => {
            let pool = Pool::builder().workers(3).build().unwrap();
            let err = pool
                .map(0..40u64, |x| {
                    assert!(x != 13, "unlucky");
                    x
                })
                .unwrap_err();
            println!("{err}");
            // The pool goes on after a task panics.
            println!(
                "{}",
                pool.map_reduce(0..100u64, |x| x, || 0, |a, b| a + b)
                    .unwrap()
            );
        }
        "crash" => {
            // A task that segfaults (here: aborts) takes down its worker process only.
            let pool = Pool::builder().workers(2).build().unwrap();
            let err = pool
                .map(0..20u64, |x| {
                    if x == 7 {
                        std::process::abort();
                    }
                    x
                })
                .unwrap_err();
            println!("{err}");
            println!(
                "{}",
                pool.map_reduce(0..100u64, |x| x, || 0, |a, b| a + b)
                    .unwrap()
            );
        }
        "kill_rank" => {
            // Item 5's task kills the serving rank whose worker runs it.
            let pool = Pool::builder().workers(2).build().unwrap();
            let result = pool.map(0..10u64, |x| {
                if x == 5 {
                    // SAFETY: getppid and kill are async-signal-safe system calls
                    // with no memory effects here.
                    unsafe { libc::kill(libc::getppid(), libc::SIGKILL) };
                    std::thread::sleep(Duration::from_secs(30));
                }
                x
            });
            println!("{result:?}");
        }
        "queue" => {
            // Tasks on serving ranks put into a queue made by rank 0.
            let pool = Pool::builder().workers(2).build().unwrap();
            let queue = multiproc::Queue::<u64>::unbounded();
            let put = pool.map_with(0..6u64, &queue, |q, x| {
                q.put(x * 3).map_err(|e| {
                    let source = std::error::Error::source(&e).map(ToString::to_string);
                    format!("{e}: {}", source.unwrap_or_default())
                })
            });
            match put {
                Ok(results) if results.iter().any(Result::is_err) => {
                    println!("{:?}", results[0]);
                }
                Ok(results) => {
                    let mut got: Vec<u64> = (0..6).map(|_| queue.get().unwrap()).collect();
                    got.sort_unstable();
                    println!("{results:?} {got:?}");
                }
                Err(e) => println!("error: {e}"),
            }
        }
        "backend" => {
            let pool = Pool::builder().backend(Backend::Mpi).build().unwrap();
            println!(
                "{}",
                pool.map_reduce(0..100u64, |x| x, || 0, |a, b| a + b)
                    .unwrap()
            );
        }
        other => panic!("unknown role {other}"),
    }
}

/// Runs `role` under `mpirun -n ranks`, with `env` set in every rank, and returns
/// its output and how long it took; gives up after `limit`.
fn mpirun(ranks: usize, role: &str, env: &[(&str, &str)], limit: Duration) -> (Output, Duration) {
    let mut command = Command::new("mpirun");
    command
        .args(["-n", &ranks.to_string(), "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env(ROLE, role);
    for (key, value) in env {
        command.env(key, value);
        command.args(["-x", key]);
    }
    command.args(["-x", ROLE]);
    command.arg(std::env::current_exe().expect("this test binary"));
    run(command, limit)
}

/// Runs `role` on one machine, without a launcher.
fn local(role: &str, env: &[(&str, &str)]) -> String {
    let mut command = Command::new(std::env::current_exe().expect("this test binary"));
    command.env(ROLE, role);
    for (key, value) in env {
        command.env(key, value);
    }
    let (out, _) = run(command, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("text")
}

fn run(mut command: Command, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun runs (Debian: apt-get install openmpi-bin)");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).map(|_| buf)
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).map(|_| buf)
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the run took longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let output = Output {
        status,
        stdout: out.join().unwrap().unwrap(),
        stderr: err.join().unwrap().unwrap(),
    };
    (output, took)
}

/// Runs `role` under `mpirun -n ranks`, which must succeed, and returns what rank
/// 0 printed.
fn mpirun_ok(ranks: usize, role: &str, env: &[(&str, &str)]) -> String {
    let (out, _) = mpirun(ranks, role, env, Duration::from_secs(120));
    let text = String::from_utf8(out.stdout).expect("text");
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The role's output under `mpirun -n ranks` equals its output on one machine.
fn same_as_local(ranks: usize, role: &str, env: &[(&str, &str)]) {
    let expected = local(role, env);
    assert_eq!(mpirun_ok(ranks, role, env), expected);
}

#[test]
fn par_map_on_three_ranks() {
    same_as_local(3, "par_map", &[]);
}

#[test]
fn map_reduce_on_three_ranks() {
    same_as_local(3, "map_reduce", &[]);
}

#[test]
fn map_with_a_shared_slice_on_three_ranks() {
    same_as_local(3, "map_with_shared", &[]);
}

#[test]
fn imap_on_three_ranks() {
    same_as_local(3, "imap", &[]);
}

#[test]
fn apply_async_with_callbacks_on_three_ranks() {
    same_as_local(3, "apply_async", &[]);
}

#[test]
fn a_pipeline_with_a_fold_stage_on_three_ranks() {
    same_as_local(3, "pipeline", &[]);
}

#[test]
fn hybrid_two_ranks_with_two_local_workers_each() {
    same_as_local(2, "map_reduce", &[("MULTIPROC_WORKERS", "2")]);
    same_as_local(2, "pipeline", &[("MULTIPROC_WORKERS", "2")]);
}

#[test]
fn a_singleton_run_without_a_launcher_works() {
    let plain = local("backend", &[]);
    assert_eq!(local("backend", &[("MULTIPROC_BACKEND", "mpi")]), plain);
    assert_eq!(plain.trim(), "4950");
}

#[test]
fn a_task_panic_at_a_serving_rank_names_the_item_and_the_rank() {
    let text = mpirun_ok(3, "panic", &[]);
    let mut lines = text.lines();
    let error = lines.next().unwrap();
    assert!(
        error.starts_with("task panicked on item 13 in worker "),
        "{error}"
    );
    assert!(error.contains(", local worker "), "{error}");
    assert!(error.contains("(rank "), "{error}");
    assert!(error.contains("unlucky"), "{error}");
    assert_eq!(lines.next(), Some("4950"));
}

#[test]
fn a_worker_that_crashes_at_a_serving_rank_is_reported_and_replaced() {
    let text = mpirun_ok(3, "crash", &[]);
    let mut lines = text.lines();
    let error = lines.next().unwrap();
    assert!(error.contains("exited before replying"), "{error}");
    assert!(error.contains("(rank "), "{error}");
    assert!(
        error.contains("SIGABRT") || error.contains("signal 6"),
        "{error}"
    );
    assert_eq!(lines.next(), Some("4950"));
}

#[test]
fn a_serving_rank_killed_ends_the_job_naming_the_rank_within_five_seconds() {
    let (out, took) = mpirun(3, "kill_rank", &[], Duration::from_secs(60));
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("rank 1") || all.contains("rank 2"), "{all}");
    assert!(took < Duration::from_secs(5), "took {took:?}:\n{all}");
}

#[test]
fn a_queue_of_rank_0_used_on_a_serving_rank_is_refused_with_the_reason_not_a_hang() {
    assert_eq!(
        local("queue", &[]).trim(),
        "[Ok(()), Ok(()), Ok(()), Ok(()), Ok(()), Ok(())] [0, 3, 6, 9, 12, 15]"
    );
    let text = mpirun_ok(3, "queue", &[]);
    assert!(
        text.starts_with("Err(\"lost the queue kept by process "),
        "{text}"
    );
    assert!(
        text.contains("only processes of its user that descend from it"),
        "{text}"
    );
}

#[test]
fn a_library_panic_at_a_serving_rank_ends_the_job() {
    let (out, took) = mpirun(
        3,
        "map_reduce",
        &[("MULTIPROC_MPI_FAULT", "panic-on-open")],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("injected panic"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
