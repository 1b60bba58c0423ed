//! Who drives the scheduler: the thread that waits, or the pool thread while
//! asynchronous work is pending; and the thread that runs callbacks.
//!
//! Holding the engine means driving it: dispatching chunks and waiting for replies.
//! A blocking call on an idle pool takes the engine on its own thread, so its round
//! trip involves no hand-off to another thread (waking a sleeping thread costs
//! 80-150 us on this kind of virtual machine, far more than the round trip). Other
//! threads submit work to an inbox and wake the driver through the backend's waker.
//! A pool thread drives only while asynchronous work (handles, `imap` chunks in
//! flight) is pending and nobody else drives. Callbacks run on one more thread, in
//! completion order, never inside the scheduler.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::backend::Waker;
use crate::engine::ends::{IterSource, Sink, Source, exact_len};
use crate::engine::job::{FoldLedger, Job, Kind, Local};
use crate::engine::scheduler::{Drive, Engine, Hooks, Submission};
use crate::error::{Error, ErrorPolicy, Result};
use crate::os::interrupt;
use crate::wire::protocol::{ContextPayload, TaskRef};

/// A piece of work for the callback thread.
pub(crate) type Callback = Box<dyn FnOnce() + Send>;

/// The state threads share, behind one short-held lock.
struct Board {
    inbox: Vec<Submission>,
    /// A thread holds the engine (or is about to).
    busy: bool,
    /// The last driver left work in flight or waiting to be sent.
    outstanding: bool,
    /// No more submissions (`close`, `terminate`, `join`, or the pool's drop).
    closed: bool,
    /// The background thread has been started.
    background: bool,
    /// Threads waiting for the engine, in the order they asked: served first come,
    /// first served, so drivers taking turns all progress.
    waiters: VecDeque<u64>,
    /// The number the next waiter gets.
    next_waiter: u64,
}

/// How long a driver keeps the engine once another thread waits for it. Each
/// blocking call drives its own job (its input and results live on its thread),
/// so concurrent calls take turns; a turn this long keeps the hand-overs (a thread
/// wake-up each, 80-150 us on a VM) to a few percent of the time.
const TURN: Duration = Duration::from_millis(5);

/// How often a thread waiting for the engine looks at Ctrl-C.
const INTERRUPT_CHECK: Duration = Duration::from_millis(50);

/// Why a thread did not get the engine.
pub(crate) enum Refused {
    /// Its deadline passed first.
    TimedOut,
    /// Ctrl-C came first (for calls that watch it).
    Interrupted,
    /// It would wait for itself (the engine is held further up this thread).
    Nested,
}

/// Everything a pool's threads and handles share.
pub(crate) struct Core {
    engine: Mutex<Engine>,
    board: Mutex<Board>,
    changed: Condvar,
    waker: Waker,
    /// Blocking callers waiting for the engine: a background driver gives it up.
    want_engine: AtomicUsize,
    inbox_queued: AtomicBool,
    terminating: AtomicBool,
    shutdown: AtomicBool,
    /// Asynchronous results submitted and not yet completed (callbacks included).
    pending: AtomicUsize,
    callbacks: Mutex<Option<mpsc::Sender<Callback>>>,
}

thread_local! {
    /// The cores whose engine this thread holds: a call that needs the same engine
    /// again (from an input iterator, `Serialize`, or a reduce run by the driver)
    /// would wait for itself.
    static DRIVING: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The engine, held by this thread; releasing it lets another thread drive.
pub(crate) struct Driving<'c> {
    core: &'c Core,
    engine: Option<MutexGuard<'c, Engine>>,
    id: usize,
    /// The last drive found nothing to do: do not hand the engine to the
    /// background thread on account of this driver.
    idle: bool,
    /// When this thread took the engine.
    since: Instant,
}

/// The hooks a driver's engine sees: the core's, and the end of the driver's turn
/// once another thread waits.
struct Turn<'c> {
    core: &'c Core,
    ends: Instant,
}

impl Hooks for Turn<'_> {
    fn take_inbox(&self) -> Vec<Submission> {
        self.core.take_inbox()
    }

    fn terminating(&self) -> bool {
        Hooks::terminating(self.core)
    }

    fn notify(&self) {
        Core::notify(self.core);
    }

    fn turn_ends(&self) -> Option<Instant> {
        (self.core.want_engine.load(Ordering::SeqCst) > 0).then_some(self.ends)
    }
}

impl Driving<'_> {
    pub(crate) fn engine(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("held until drop")
    }

    /// Drives until `until` holds, the deadline passes, or nothing more can happen.
    pub(crate) fn drive(
        &mut self,
        local: Option<&mut Local<'_>>,
        until: &mut dyn FnMut(&Engine) -> bool,
        deadline: Option<Instant>,
    ) -> Result<Drive> {
        let turn = Turn {
            core: self.core,
            ends: self.since + TURN,
        };
        let result = self.engine().drive(&turn, local, until, deadline);
        self.idle = matches!(result, Ok(Drive::Idle));
        result
    }

    /// Drives as [`drive`](Self::drive) does, taking turns with other threads that
    /// wait for the engine: when this one's turn is over it hands the engine over,
    /// waits for it again, and goes on. Never returns [`Drive::Yielded`].
    pub(crate) fn drive_taking_turns(
        &mut self,
        mut local: Option<&mut Local<'_>>,
        until: &mut dyn FnMut(&Engine) -> bool,
        deadline: Option<Instant>,
    ) -> Result<Drive> {
        loop {
            match self.drive(local.as_deref_mut(), until, deadline)? {
                Drive::Yielded => self.hand_over()?,
                driven => return Ok(driven),
            }
        }
    }

    /// Lets the threads waiting for the engine have it, then takes it back (this
    /// thread queues behind them).
    fn hand_over(&mut self) -> Result<()> {
        let core = self.core;
        self.release();
        match core.acquire(None, false) {
            Ok(again) => {
                *self = again;
                Ok(())
            }
            Err(_) => Err(Error::NestedCall),
        }
    }

    /// Gives the engine up: the next waiter, or the background thread, may drive.
    fn release(&mut self) {
        let Some(engine) = self.engine.take() else {
            return;
        };
        let outstanding = !self.idle && engine.outstanding();
        drop(engine);
        DRIVING.with(|d| {
            let mut d = d.borrow_mut();
            if let Some(at) = d.iter().rposition(|&id| id == self.id) {
                d.remove(at);
            }
        });
        let mut board = self.core.lock_board();
        board.busy = false;
        board.outstanding = outstanding;
        drop(board);
        self.core.changed.notify_all();
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl Core {
    pub(crate) fn new(engine: Engine) -> Arc<Self> {
        let waker = engine.workers.backend.waker();
        Arc::new(Self {
            engine: Mutex::new(engine),
            board: Mutex::new(Board {
                inbox: Vec::new(),
                busy: false,
                outstanding: false,
                closed: false,
                background: false,
                waiters: VecDeque::new(),
                next_waiter: 0,
            }),
            changed: Condvar::new(),
            waker,
            want_engine: AtomicUsize::new(0),
            inbox_queued: AtomicBool::new(false),
            terminating: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            callbacks: Mutex::new(None),
        })
    }

    fn lock_board(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    fn drives_here(&self) -> bool {
        let id = self.id();
        DRIVING.with(|d| d.borrow().contains(&id))
    }

    fn hold(&self) -> Driving<'_> {
        let id = self.id();
        DRIVING.with(|d| d.borrow_mut().push(id));
        // The engine lock is never contended: `busy` on the board hands it over.
        // A panic in user code run by a driver (an input iterator, a reduce)
        // poisons it; the engine's state is still consistent between events.
        let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        Driving {
            core: self,
            engine: Some(engine),
            id,
            idle: false,
            since: Instant::now(),
        }
    }

    /// Takes the engine, waiting for whoever drives to hand it over.
    ///
    /// # Errors
    ///
    /// [`Error::NestedCall`] when this thread holds it already.
    pub(crate) fn lock_engine(&self) -> Result<Driving<'_>> {
        self.acquire(None, false).map_err(|_| Error::NestedCall)
    }

    /// Takes the engine, waiting in line behind the threads that asked before, at
    /// most until `deadline`, and (when `watch_interrupt`) only until Ctrl-C.
    pub(crate) fn acquire(
        &self,
        deadline: Option<Instant>,
        watch_interrupt: bool,
    ) -> std::result::Result<Driving<'_>, Refused> {
        if self.drives_here() {
            return Err(Refused::Nested);
        }
        let mut board = self.lock_board();
        if board.busy || !board.waiters.is_empty() {
            let me = board.next_waiter;
            board.next_waiter += 1;
            board.waiters.push_back(me);
            self.want_engine.fetch_add(1, Ordering::SeqCst);
            self.waker.wake();
            let waited = loop {
                if !board.busy && board.waiters.front() == Some(&me) {
                    break Ok(());
                }
                if watch_interrupt && interrupt::interrupted() {
                    break Err(Refused::Interrupted);
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    break Err(Refused::TimedOut);
                }
                let check = watch_interrupt.then(|| now + INTERRUPT_CHECK);
                board = match [deadline, check].into_iter().flatten().min() {
                    None => self.changed.wait(board).unwrap_or_else(|p| p.into_inner()),
                    Some(until) => {
                        let left = until.saturating_duration_since(now);
                        self.changed
                            .wait_timeout(board, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                };
            };
            board.waiters.retain(|&w| w != me);
            self.want_engine.fetch_sub(1, Ordering::SeqCst);
            if let Err(refused) = waited {
                drop(board);
                // The next in line may be free to go now.
                self.changed.notify_all();
                return Err(refused);
            }
        }
        board.busy = true;
        drop(board);
        Ok(self.hold())
    }

    /// Like [`Core::lock_engine`], for calls that start work: fails once the pool is
    /// closed.
    pub(crate) fn lock_open_engine(&self) -> Result<Driving<'_>> {
        let driving = self.lock_engine()?;
        self.check_open()?;
        Ok(driving)
    }

    /// Whether the pool still takes work: [`Error::Terminated`] after `terminate`,
    /// [`Error::PoolClosed`] after `close`.
    fn check_open(&self) -> Result<()> {
        if self.terminating.load(Ordering::SeqCst) {
            return Err(Error::Terminated);
        }
        if self.lock_board().closed {
            return Err(Error::PoolClosed);
        }
        Ok(())
    }

    /// Waits until `ready()` holds or the deadline passes, driving the engine
    /// whenever no other thread does. `ready` is called with the board locked, and
    /// whatever makes it true calls [`Core::notify`] afterwards. Returns whether it
    /// holds.
    pub(crate) fn wait_until(
        &self,
        ready: &dyn Fn() -> bool,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        loop {
            if ready() {
                return Ok(true);
            }
            let mut board = self.lock_board();
            if !board.busy && self.want_engine.load(Ordering::SeqCst) == 0 {
                if self.drives_here() {
                    return Err(Error::NestedCall);
                }
                board.busy = true;
                drop(board);
                let mut driving = self.hold();
                // A blocking call that wants the engine gets it: it serves every
                // job, this one's too.
                let mut until = |_: &Engine| ready() || self.want_engine.load(Ordering::SeqCst) > 0;
                let outcome = driving.drive(None, &mut until, deadline);
                drop(driving);
                match outcome? {
                    Drive::Satisfied if ready() => return Ok(true),
                    Drive::Satisfied => {}
                    Drive::TimedOut => return Ok(ready()),
                    Drive::Yielded => {}
                    Drive::Idle => {
                        // Nothing in flight: what `ready` waits for happens on
                        // another thread (a callback) or after a new submission.
                        let board = self.lock_board();
                        if ready() || !board.inbox.is_empty() {
                            continue;
                        }
                        if !self.wait_changed(board, deadline) {
                            return Ok(ready());
                        }
                    }
                }
                continue;
            }
            if !self.wait_changed(board, deadline) {
                return Ok(ready());
            }
        }
    }

    /// Waits for a notification; false when the deadline passed first.
    fn wait_changed(&self, board: MutexGuard<'_, Board>, deadline: Option<Instant>) -> bool {
        match deadline {
            None => {
                drop(self.changed.wait(board).unwrap_or_else(|p| p.into_inner()));
                true
            }
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                let (_board, result) = self
                    .changed
                    .wait_timeout(board, left)
                    .unwrap_or_else(|p| p.into_inner());
                !result.timed_out()
            }
        }
    }

    /// Wakes every waiting thread: something completed.
    pub(crate) fn notify(&self) {
        drop(self.lock_board());
        self.changed.notify_all();
    }

    /// Queues asynchronous work. `pending` counts the results it will complete.
    pub(crate) fn submit(self: &Arc<Self>, submission: Submission, pending: usize) -> Result<()> {
        if self.terminating.load(Ordering::SeqCst) {
            return Err(Error::Terminated);
        }
        let mut board = self.lock_board();
        if board.closed {
            return Err(Error::PoolClosed);
        }
        self.pending.fetch_add(pending, Ordering::SeqCst);
        board.inbox.push(submission);
        self.inbox_queued.store(true, Ordering::SeqCst);
        let busy = board.busy;
        let start_background = !std::mem::replace(&mut board.background, true);
        drop(board);
        if start_background {
            self.start_background();
        }
        if busy {
            self.waker.wake();
        } else {
            self.changed.notify_all();
        }
        Ok(())
    }

    /// One asynchronous result completed (after its callbacks).
    pub(crate) fn completed_one(&self) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// Asynchronous results not yet completed.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Runs `callback` on the pool's callback thread, after those queued before it.
    pub(crate) fn run_callback(&self, callback: Callback) {
        let mut slot = self.callbacks.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let (tx, rx) = mpsc::channel::<Callback>();
            let started = thread::Builder::new()
                .name("multiproc-callbacks".into())
                .spawn(move || {
                    for callback in rx {
                        callback();
                    }
                });
            match started {
                Ok(_) => *slot = Some(tx),
                // No thread to run it on: run it here, so the result is not lost.
                Err(_) => return callback(),
            }
        }
        if let Err(mpsc::SendError(callback)) = slot.as_ref().expect("set above").send(callback) {
            // The callback thread is gone (it never ends before the pool): run it here.
            callback();
        }
    }

    fn start_background(self: &Arc<Self>) {
        let core = Arc::clone(self);
        let started = thread::Builder::new()
            .name("multiproc-pool".into())
            .spawn(move || core.background());
        if started.is_err() {
            // Without the thread, asynchronous work still moves whenever a caller
            // waits on a handle (waiters drive); mark it so a later submission tries
            // again.
            self.lock_board().background = false;
        }
    }

    /// The pool thread: drives while asynchronous work is pending and nobody else
    /// drives.
    fn background(&self) {
        loop {
            let mut board = self.lock_board();
            loop {
                if self.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                let work = board.outstanding
                    || !board.inbox.is_empty()
                    || self.terminating.load(Ordering::SeqCst);
                if !board.busy && work && self.want_engine.load(Ordering::SeqCst) == 0 {
                    break;
                }
                board = self.changed.wait(board).unwrap_or_else(|p| p.into_inner());
            }
            board.busy = true;
            drop(board);
            let mut driving = self.hold();
            let mut until = |_: &Engine| {
                self.want_engine.load(Ordering::SeqCst) > 0 || self.shutdown.load(Ordering::SeqCst)
            };
            // An error has been given to every job already.
            let _ = driving.drive(None, &mut until, None);
        }
    }

    /// Marks the pool closed: submissions fail from now on.
    pub(crate) fn close(&self) {
        self.lock_board().closed = true;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock_board().closed
    }

    /// Asks whoever drives to terminate every job and stop the workers, and does it
    /// when nobody drives.
    pub(crate) fn terminate(&self) -> Result<()> {
        self.terminating.store(true, Ordering::SeqCst);
        self.close();
        self.waker.wake();
        self.changed.notify_all();
        let mut driving = self.lock_engine()?;
        let engine = driving.engine();
        if !engine.terminated {
            engine.terminate();
        }
        engine.workers.backend.shutdown();
        drop(driving);
        self.notify();
        Ok(())
    }

    /// Stops the pool thread (the pool is being dropped).
    pub(crate) fn stop_background(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.waker.wake();
        self.changed.notify_all();
    }
}

impl Hooks for Core {
    fn take_inbox(&self) -> Vec<Submission> {
        if !self.inbox_queued.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut board = self.lock_board();
        self.inbox_queued.store(false, Ordering::SeqCst);
        std::mem::take(&mut board.inbox)
    }

    fn terminating(&self) -> bool {
        self.terminating.load(Ordering::SeqCst)
    }

    fn notify(&self) {
        Core::notify(self);
    }
}

/// How long running tasks may finish after Ctrl-C before their workers are killed.
const INTERRUPT_GRACE: Duration = Duration::from_millis(250);

/// A blocking call's job, whose source and sink the caller lends while it drives.
pub(crate) struct LentCall<'a> {
    pub(crate) task: TaskRef,
    /// The encoded context value, sent once to each worker.
    pub(crate) context: Option<ContextPayload<'a>>,
    pub(crate) policy: ErrorPolicy,
    /// For a fold job: the ledger of what each worker folded (the job is unordered).
    pub(crate) fold: Option<FoldLedger>,
    /// Stop on Ctrl-C, letting running tasks finish for [`INTERRUPT_GRACE`].
    pub(crate) interrupt: bool,
    /// The longest the call may take.
    pub(crate) call_timeout: Option<Duration>,
}

impl Core {
    /// Runs `call` on this thread until its job ends: the caller's iterator is read
    /// as workers take chunks, and replies go to `sink`. On Ctrl-C (when asked) or
    /// past the call timeout the job is abandoned and its running chunks stopped; a
    /// panic in user code run here (the iterator, `Serialize`, a reduce) removes the
    /// job before it goes on, so the pool stays usable.
    pub(crate) fn run_lent<I, T>(
        &self,
        call: LentCall<'_>,
        items: I,
        sink: &mut dyn Sink,
    ) -> Result<()>
    where
        I: Iterator<Item = T>,
        T: Serialize + DeserializeOwned,
    {
        let total = exact_len(&items);
        self.run_lent_source(call, total, &mut IterSource::new(items), sink)
    }

    /// [`Core::run_lent`] with a source of the caller's own (a checkpoint's, which
    /// passes over the items it holds); `total` is how many items it yields, when
    /// known (for progress bars).
    pub(crate) fn run_lent_source(
        &self,
        call: LentCall<'_>,
        total: Option<usize>,
        source: &mut dyn Source,
        sink: &mut dyn Sink,
    ) -> Result<()> {
        let LentCall {
            task,
            context,
            policy,
            fold,
            interrupt,
            call_timeout,
        } = call;
        let deadline = call_timeout.and_then(|timeout| Instant::now().checked_add(timeout));
        let ctrl_c = interrupt.then(interrupt::Guard::install).flatten();
        let watch = ctrl_c.is_some();
        // Another call may be driving its own job: wait in line for a turn, within
        // this call's own deadline and Ctrl-C.
        let mut driving = match self.acquire(deadline, watch) {
            Ok(driving) => driving,
            Err(Refused::TimedOut) => {
                let timeout = call_timeout.expect("a deadline comes from the call timeout");
                return Err(Error::CallTimedOut { timeout, done: 0 });
            }
            Err(Refused::Interrupted) => return Err(Error::Interrupted { done: 0 }),
            Err(Refused::Nested) => return Err(Error::NestedCall),
        };
        self.check_open()?;
        let ordered = fold.is_none();
        let mut job = driving
            .engine()
            .new_job(task, Kind::Lent, ordered, context)?;
        job.policy = policy;
        job.fold = fold;
        job.total = total;
        let id = driving.engine().add(job);
        let mut local = Local {
            job: id,
            source: Some(source),
            sink: Some(sink),
        };
        let mut until = |engine: &Engine| {
            engine.job(id).is_none_or(Job::ended) || (watch && interrupt::interrupted())
        };
        // User code runs inside (the input iterator, `Serialize`, the reduce): if it
        // panics, the job leaves the table before the panic goes on, so its late
        // replies are ignored and the pool stays usable.
        let driven = panic::catch_unwind(AssertUnwindSafe(|| {
            driving.drive_taking_turns(Some(&mut local), &mut until, deadline)
        }));
        if watch
            && matches!(driven, Ok(Ok(_)))
            && interrupt::interrupted()
            && driving.engine().job(id).is_some_and(|job| !job.ended())
        {
            // Ctrl-C: send nothing more, let running tasks finish for a moment,
            // then stop the workers still running this job's chunks.
            let engine = driving.engine();
            engine.stop_dispatch(id);
            let mut drained =
                |engine: &Engine| engine.job(id).is_none_or(|j| j.ended() || j.in_flight == 0);
            let grace = Instant::now() + INTERRUPT_GRACE;
            let _ = driving.drive_taking_turns(Some(&mut local), &mut drained, Some(grace));
            let engine = driving.engine();
            let done = engine.job(id).map_or(0, |job| job.items_delivered);
            engine.abandon(id, Error::Interrupted { done });
        }
        drop(ctrl_c);
        if let (Ok(Ok(Drive::TimedOut)), Some(timeout)) = (&driven, call_timeout) {
            let engine = driving.engine();
            let done = engine.job(id).map_or(0, |job| job.items_delivered);
            engine.abandon(id, Error::CallTimedOut { timeout, done });
        }
        let outcome = driving.engine().remove(id);
        let driven = match driven {
            Ok(driven) => driven,
            Err(payload) => {
                drop(driving);
                panic::resume_unwind(payload)
            }
        };
        driven?;
        outcome.unwrap_or(Err(Error::Terminated))
    }
}
