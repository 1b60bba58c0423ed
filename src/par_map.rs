//! par_map / par_map_reduce: split the input into chunks, dispatch them, deliver in order.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::Event;
use crate::chunker::{Sizer, TARGET_CHUNK_BYTES};
use crate::codec;
use crate::error::{Error, Result};
use crate::pool::{Pool, PoolInner};
use crate::protocol::{self, ChunkHeader, Failure, Reply, Request};
use crate::task::TaskRef;
use crate::transport::{Frame, FrameBuf, POLL_BEFORE_BLOCKING};

/// Chunks a worker may hold at once: one running, one queued behind it, so a worker
/// never waits for the parent between chunks. A queued frame fits the socket's
/// send buffer (one packet of up to `transport::INLINE_LIMIT`), so a send never waits for a
/// busy worker; at most it waits the moment a just-woken worker takes to read the
/// frame before it.
const CREDIT: usize = 2;

/// Applies `task` to every item on the default pool; results in input order.
///
/// The default pool is started on first use with one worker per CPU
/// (`num_cpus::get()`) and lives until the process exits. Calls from several threads
/// take turns. See [`Pool::map`] for the details and [`Pool::builder`] to choose
/// the worker count.
///
/// # Errors
///
/// As [`Pool::map`], and those of [`PoolBuilder::build`](crate::PoolBuilder::build)
/// when the default pool cannot be started.
///
/// # Examples
///
/// ```standalone_crate
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// fn main() -> multiproc::Result<()> {
///     multiproc::init(); // in a worker process this call serves tasks and never returns
///     assert_eq!(multiproc::par_map(vec![1u64, 2, 3], square)?, [1, 4, 9]);
///     Ok(())
/// }
/// ```
pub fn par_map<I, T, U, F>(items: I, task: F) -> Result<Vec<U>>
where
    I: IntoIterator<Item = T>,
    T: Serialize + DeserializeOwned,
    U: Serialize + DeserializeOwned,
    F: Fn(T) -> U + Copy + Send + Sync,
{
    default_pool()?.map(items, task)
}

/// Maps every item and combines the results with an associative `reduce`, on the
/// default pool. See [`Pool::map_reduce`].
///
/// # Errors
///
/// As [`Pool::map_reduce`] and [`par_map`].
///
/// # Examples
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let total: u64 = multiproc::par_map_reduce(0..1_000u64, |x| x * x, || 0, |a, b| a + b)?;
///     assert_eq!(total, 332_833_500);
///     Ok(())
/// }
/// ```
pub fn par_map_reduce<I, T, U, F, Id, R>(items: I, task: F, identity: Id, reduce: R) -> Result<U>
where
    I: IntoIterator<Item = T>,
    T: Serialize + DeserializeOwned,
    U: Serialize + DeserializeOwned,
    F: Fn(T) -> U + Copy + Send + Sync,
    Id: Fn() -> U + Copy + Send + Sync,
    R: Fn(U, U) -> U + Copy + Send + Sync,
{
    default_pool()?.map_reduce(items, task, identity, reduce)
}

fn default_pool() -> Result<Arc<Pool>> {
    static DEFAULT: Mutex<Option<Arc<Pool>>> = Mutex::new(None);
    let mut slot = DEFAULT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pool) = slot.as_ref() {
        return Ok(Arc::clone(pool));
    }
    let pool = Arc::new(Pool::builder().build()?);
    *slot = Some(Arc::clone(&pool));
    Ok(pool)
}

/// Receives each chunk's reply payload, in chunk order: `(worker, items, payload)`.
pub(crate) type Deliver<'a> = dyn FnMut(usize, Range<usize>, &[u8]) -> Result<()> + 'a;

/// Runs one call: feeds `items` to the workers in chunks and hands every chunk's reply
/// payload to `deliver` in input order.
pub(crate) fn run<T, I>(
    pool: &mut PoolInner,
    items: I,
    task: TaskRef,
    context: Option<&[u8]>,
    deliver: &mut Deliver<'_>,
) -> Result<()>
where
    T: Serialize + DeserializeOwned,
    I: Iterator<Item = T>,
{
    revive(pool)?;
    let call = pool.next_call;
    pool.next_call += 1;
    let context = match context {
        Some(bytes) => {
            let mut frame = FrameBuf::with_capacity(bytes.len() + 64);
            frame.body().extend_from_slice(bytes);
            protocol::seal(&mut frame, &Request::Context { call }).map_err(|source| {
                Error::Context {
                    worker: None,
                    source,
                }
            })?;
            Some(frame)
        }
        None => None,
    };
    let workers = pool.backend.workers();
    let fixed = pool.chunk_size;
    let mut run = Call {
        pool,
        call,
        task,
        context,
        items,
        next_item: 0,
        exhausted: false,
        next_chunk: 0,
        next_deliver: 0,
        window: (4 * CREDIT * workers) as u64,
        in_flight: (0..workers).map(|_| VecDeque::new()).collect(),
        has_context: vec![false; workers],
        usable: vec![true; workers],
        killed: vec![false; workers],
        ready: BTreeMap::new(),
        failure: None,
        sizer: Sizer::new(fixed),
    };
    let result = run.drive(deliver);
    drop(run);
    if pool.frame.body().capacity() > KEEP_FRAME {
        // One huge item (or a large fixed chunk size) must not pin its buffer for the
        // life of the pool.
        pool.frame = FrameBuf::with_capacity(TARGET_CHUNK_BYTES + 1024);
    }
    result
}

/// Largest request buffer a pool keeps between calls.
const KEEP_FRAME: usize = 4 << 20;

/// Replaces lost workers, or all of them after a call that left work behind.
fn revive(pool: &mut PoolInner) -> Result<()> {
    pool.backend.forget_exited();
    let dirty = std::mem::take(&mut pool.dirty);
    for worker in 0..pool.backend.workers() {
        if (dirty || !pool.backend.is_alive(worker))
            && let Err(e) = pool.backend.restart(worker)
        {
            // The next call tries again, from the start if this one was dirty.
            pool.dirty = dirty;
            return Err(e);
        }
    }
    Ok(())
}

struct InFlight {
    chunk: u64,
    items: Range<usize>,
}

struct Ready {
    worker: usize,
    items: Range<usize>,
    frame: Frame,
    payload_len: usize,
}

/// The state of one call.
struct Call<'p, I> {
    pool: &'p mut PoolInner,
    call: u64,
    task: TaskRef,
    /// The sealed `Request::Context` frame of this call, built once, sent to each
    /// worker before its first chunk.
    context: Option<FrameBuf>,
    items: I,
    /// Index of the next item the iterator yields.
    next_item: usize,
    exhausted: bool,
    next_chunk: u64,
    /// The chunk whose results are delivered next.
    next_deliver: u64,
    /// How far dispatch may run ahead of delivery, in chunks: bounds the reorder
    /// buffer (and the input read ahead) when one chunk is slow.
    window: u64,
    in_flight: Vec<VecDeque<InFlight>>,
    has_context: Vec<bool>,
    /// False for a worker a send failed to; it is killed and its loss is pending.
    usable: Vec<bool>,
    /// True for a worker this call killed after recording why; its loss adds nothing.
    killed: Vec<bool>,
    /// Replies that arrived before an earlier chunk's.
    ready: BTreeMap<u64, Ready>,
    /// The failure with the lowest item index so far.
    failure: Option<(usize, Error)>,
    sizer: Sizer,
}

impl<T, I> Call<'_, I>
where
    T: Serialize + DeserializeOwned,
    I: Iterator<Item = T>,
{
    fn drive(&mut self, deliver: &mut Deliver<'_>) -> Result<()> {
        loop {
            self.dispatch();
            if self.in_flight.iter().all(VecDeque::is_empty)
                && (self.exhausted || self.failure.is_some())
            {
                break;
            }
            // Either replies are due, or input remains and every worker that could
            // take it is being lost (a send to it failed): its loss event comes next,
            // and with no live worker at all `next_event` fails instead of waiting.
            let event = match self.pool.backend.next_event(self.reply_expected_soon()) {
                Ok(event) => event,
                // A failure already recorded explains more than "no live worker".
                Err(e) => return Err(self.failure.take().map_or(e, |(_, first)| first)),
            };
            self.handle(event, deliver);
        }
        match self.failure.take() {
            Some((_, error)) => Err(error),
            None => {
                debug_assert!(self.ready.is_empty() && self.next_deliver == self.next_chunk);
                Ok(())
            }
        }
    }

    /// Whether the shortest chunk in flight should finish within the polling window,
    /// so waiting for it is better spent polling than sleeping.
    fn reply_expected_soon(&self) -> bool {
        let shortest = self
            .in_flight
            .iter()
            .filter_map(|q| q.front())
            .map(|f| f.items.len())
            .min()
            .unwrap_or(0);
        self.sizer.estimate_nanos(shortest) <= POLL_BEFORE_BLOCKING.as_nanos() as f64
    }

    fn fail(&mut self, item: usize, error: Error) {
        if self.failure.as_ref().is_none_or(|(first, _)| item < *first) {
            self.failure = Some((item, error));
        }
        self.ready.clear();
    }

    /// Sends chunks while some worker has credit and the window allows.
    fn dispatch(&mut self) {
        while !self.exhausted && self.failure.is_none() {
            if self.next_chunk >= self.next_deliver + self.window {
                return;
            }
            let Some(worker) = self.pick_worker() else {
                return;
            };
            if !self.send_context(worker, self.next_item) {
                continue;
            }
            let Some(items) = self.encode_chunk() else {
                return;
            };
            let chunk = self.next_chunk;
            self.next_chunk += 1;
            let start = items.start;
            self.in_flight[worker].push_back(InFlight { chunk, items });
            self.send_chunk(worker, start);
        }
    }

    /// Sends the encoded chunk in the pool's frame to `worker`. A worker that turns
    /// out to have died while idle (nothing else in flight) is replaced and the chunk
    /// sent again; otherwise the chunk stays recorded and the worker's loss reports it.
    fn send_chunk(&mut self, worker: usize, start: usize) {
        let Err(source) = self.pool.backend.send(worker, &mut self.pool.frame) else {
            return;
        };
        if is_hang_up(&source) && self.in_flight[worker].len() == 1 {
            match self.replace(worker) {
                Ok(()) if self.send_context(worker, start) => {
                    if let Err(source) = self.pool.backend.send(worker, &mut self.pool.frame) {
                        self.send_failed(worker, start, source);
                    }
                }
                Ok(()) => {} // the context send failed and said why
                Err(e) => {
                    // No process holds the chunk and none will report its loss.
                    self.in_flight[worker].pop_back();
                    self.usable[worker] = false;
                    self.fail(start, e);
                }
            }
            return;
        }
        self.send_failed(worker, start, source);
    }

    /// Replaces `worker` by a fresh process, keeping its in-flight record.
    fn replace(&mut self, worker: usize) -> Result<()> {
        self.pool.backend.restart(worker)?;
        self.has_context[worker] = false;
        self.usable[worker] = true;
        self.killed[worker] = false;
        Ok(())
    }

    /// The live worker with the most free credit, the lowest-numbered among equals:
    /// a worker that just replied is still polling for work, so small calls go to
    /// the same warm worker instead of waking a sleeping one.
    fn pick_worker(&self) -> Option<usize> {
        (0..self.in_flight.len())
            .filter(|&w| {
                self.usable[w] && self.pool.backend.is_alive(w) && self.in_flight[w].len() < CREDIT
            })
            .min_by_key(|&w| self.in_flight[w].len())
    }

    /// Sends this call's context to `worker` unless it has it or the call has none;
    /// false when that failed (the failure is recorded or the worker is being lost).
    fn send_context(&mut self, worker: usize, item: usize) -> bool {
        let Some(frame) = self.context.as_mut() else {
            return true;
        };
        if self.has_context[worker] {
            return true;
        }
        match self.pool.backend.send(worker, frame) {
            Ok(()) => {
                self.has_context[worker] = true;
                true
            }
            Err(source) => {
                // The loss event restarts it if the call still needs it.
                self.send_failed(worker, item, source);
                false
            }
        }
    }

    /// A send to `worker` failed: stop using it, make sure it is gone (its loss event
    /// reports its chunks), and keep the error unless it only says the worker died.
    fn send_failed(&mut self, worker: usize, item: usize, source: std::io::Error) {
        self.usable[worker] = false;
        self.pool.backend.kill(worker);
        if !is_hang_up(&source) {
            self.killed[worker] = true;
            let worker = Some(worker);
            self.fail(item, Error::Transport { worker, source });
        }
    }

    /// Encodes the next chunk into the pool's frame; `None` when there is nothing to
    /// send (input exhausted, or an item failed to encode).
    fn encode_chunk(&mut self) -> Option<Range<usize>> {
        let workers = self.in_flight.len();
        let size = self.sizer.next(self.items.size_hint().0, workers);
        let byte_cap = if self.sizer.fixed.is_some() {
            usize::MAX
        } else {
            TARGET_CHUNK_BYTES
        };
        let first = self.next_item;
        let frame = &mut self.pool.frame;
        frame.clear();
        let mut count = 0;
        while count < size && frame.body_len() < byte_cap {
            let Some(item) = self.items.next() else {
                self.exhausted = true;
                break;
            };
            let index = first + count;
            let start = frame.body().len();
            if let Err(source) = codec::encode_into(&item, frame.body()) {
                self.fail(
                    index,
                    Error::EncodeItem {
                        item: index,
                        source,
                    },
                );
                return None;
            }
            if index == 0 {
                // Serde attributes that need a self-describing format encode fine and
                // fail only when decoded; say so before any worker sees the item.
                if let Err(source) = codec::decode::<T>(&frame.body()[start..]) {
                    self.fail(
                        index,
                        Error::DecodeItem {
                            item: 0,
                            worker: None,
                            source,
                        },
                    );
                    return None;
                }
            }
            count += 1;
        }
        self.next_item += count;
        if count == 0 {
            return None;
        }
        let header = Request::Chunk(ChunkHeader {
            call: self.call,
            chunk: self.next_chunk,
            first_item: first as u64,
            count: u32::try_from(count).expect("chunks hold at most MAX_CHUNK_ITEMS items"),
            task: self.task,
        });
        if let Err(source) = protocol::seal(frame, &header) {
            self.fail(
                first,
                Error::EncodeItem {
                    item: first,
                    source,
                },
            );
            return None;
        }
        Some(first..first + count)
    }

    fn handle(&mut self, event: Event, deliver: &mut Deliver<'_>) {
        match event {
            Event::Reply { worker, frame } => self.handle_reply(worker, frame, deliver),
            Event::Broken { worker, reason } => self.protocol_error(worker, reason),
            Event::Lost { worker, status } => {
                self.has_context[worker] = false;
                let lost: Vec<InFlight> = self.in_flight[worker].drain(..).collect();
                if std::mem::take(&mut self.killed[worker]) {
                    // Killed by this call, which already recorded why.
                } else if let Some(first) = lost.first() {
                    let items = first.items.clone();
                    self.fail(
                        items.start,
                        Error::WorkerExited {
                            worker,
                            items,
                            status,
                        },
                    );
                } else if self.failure.is_none() && !self.exhausted {
                    // Lost while idle: replace it and carry on.
                    if let Err(e) = self.replace(worker) {
                        self.fail(self.next_item, e);
                    }
                }
            }
        }
    }

    fn handle_reply(&mut self, worker: usize, frame: Frame, deliver: &mut Deliver<'_>) {
        let (reply, payload_len) = match protocol::open::<Reply>(&frame) {
            Ok((reply, payload)) => (reply, payload.len()),
            Err(reason) => return self.protocol_error(worker, reason),
        };
        let (call, chunk) = match &reply {
            Reply::Done { call, chunk, .. } | Reply::Failed { call, chunk, .. } => (*call, *chunk),
        };
        let position = self.in_flight[worker].iter().position(|f| f.chunk == chunk);
        let (true, Some(position)) = (call == self.call, position) else {
            return self.protocol_error(
                worker,
                format!("unexpected reply for chunk {chunk} of call {call}"),
            );
        };
        let flight = self.in_flight[worker]
            .remove(position)
            .expect("position was just found");
        match reply {
            Reply::Done { nanos, .. } => {
                self.sizer.observe(nanos, flight.items.len());
                if self.failure.is_none() {
                    let ready = Ready {
                        worker,
                        items: flight.items,
                        frame,
                        payload_len,
                    };
                    self.ready.insert(chunk, ready);
                    self.deliver_ready(deliver);
                }
            }
            Reply::Failed { failure, .. } => {
                let (item, error) = describe(failure, worker, flight.items);
                self.fail(item, error);
            }
        }
    }

    fn protocol_error(&mut self, worker: usize, reason: String) {
        let item = self.in_flight[worker]
            .front()
            .map_or(self.next_item, |f| f.items.start);
        self.fail(item, Error::Protocol { worker, reason });
        // The worker's state is unknown: stop it; its loss drains its chunks.
        self.usable[worker] = false;
        self.killed[worker] = true;
        self.pool.backend.kill(worker);
    }

    fn deliver_ready(&mut self, deliver: &mut Deliver<'_>) {
        while let Some(ready) = self.ready.remove(&self.next_deliver) {
            self.next_deliver += 1;
            let payload = &ready.frame[..ready.payload_len];
            if let Err(error) = deliver(ready.worker, ready.items.clone(), payload) {
                self.fail(ready.items.start, error);
                return;
            }
        }
    }
}

impl<I> Drop for Call<'_, I> {
    fn drop(&mut self) {
        if self.in_flight.iter().any(|q| !q.is_empty()) {
            self.pool.dirty = true;
        }
    }
}

/// Whether a send failed only because the worker is gone.
fn is_hang_up(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, NotConnected};
    matches!(error.kind(), BrokenPipe | ConnectionReset | NotConnected)
}

/// Turns a worker's failure report into an error and the item it concerns.
fn describe(failure: Failure, worker: usize, items: Range<usize>) -> (usize, Error) {
    let at = |item: u64| usize::try_from(item).unwrap_or(usize::MAX);
    match failure {
        Failure::Panicked { item, panic } => {
            let item = at(item);
            (
                item,
                Error::TaskPanicked {
                    item,
                    worker,
                    panic,
                },
            )
        }
        Failure::DecodeItem { item, error } => {
            let item = at(item);
            (
                item,
                Error::DecodeItem {
                    item,
                    worker: Some(worker),
                    source: error,
                },
            )
        }
        Failure::EncodeResult {
            item: Some(item),
            error,
        } => {
            let item = at(item);
            (
                item,
                Error::Result {
                    items: item..item.saturating_add(1),
                    worker,
                    source: error,
                },
            )
        }
        Failure::EncodeResult { item: None, error } => (
            items.start,
            Error::Result {
                items,
                worker,
                source: error,
            },
        ),
        Failure::DecodeContext { error } => (
            items.start,
            Error::Context {
                worker: Some(worker),
                source: error,
            },
        ),
        Failure::Malformed { reason } => (items.start, Error::Protocol { worker, reason }),
    }
}
