//! Queue: many producers, many consumers, across the processes of a job.
//!
//! The items live in the process that created the queue, encoded. Handles in that
//! process use them directly; a handle that crossed to another process (inside a
//! `Process` argument, a pool item, another queue's item) connects to the creator's
//! rendezvous (`broker.rs`) on first use, and a thread there serves its requests.
//! Each request is one frame: `length (u32) | tag (u8) | wait (u64) | descriptors
//! (u16) | payload`, then, for an item naming shared inputs, one byte carrying
//! copies of their descriptors (SCM_RIGHTS): the queue keeps them with the item.
//! An item answered to a `get` stays with the connection's server thread until the
//! client's next frame (an `ACK`, written as soon as the item is read), and goes
//! back to the front of the queue if the connection drops before.
//!
//! A connection carries one request at a time, and a request holds its connection
//! until the answer comes, which may be a long wait (a `get` on an empty queue). So
//! a remote handle keeps a small set of connections: a request takes an idle one or
//! opens another, and gives it back once answered. Threads sharing a handle never
//! wait behind each other's requests, and a connection still has at most one request
//! in flight, so its server thread can read the peer's hang-up while it waits.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::channels::broker::{self, Address};
use crate::error::{CodecError, Error, Result};
use crate::os::{poll, signals, socket};
use crate::shared::region;
use crate::wire::codec;

// Requests.
const PUT: u8 = 1;
const GET: u8 = 2;
const CLOSE: u8 = 3;
/// The consumer has read the item it was handed last on this connection (no answer).
const ACK: u8 = 4;
// Answers.
const OK: u8 = 10;
const ITEM: u8 = 11;
const FULL: u8 = 12;
const EMPTY: u8 = 13;
const TIMED_OUT: u8 = 14;
const CLOSED: u8 = 15;

/// Fault injection for tests: the next remote `get` of this process kills it once
/// its answer is on the way, before reading it.
static DIE_BEFORE_READING: AtomicBool = AtomicBool::new(false);

/// Makes this process die (SIGKILL) in its next remote `get`, after the creator
/// sent the answer and before a byte of it is read: the moment an item handed over
/// would be lost without acknowledgements.
pub(crate) fn die_before_reading_next_item() {
    DIE_BEFORE_READING.store(true, Ordering::Relaxed);
}

/// `wait` value meaning "as long as it takes".
const FOREVER: u64 = u64::MAX;

/// How often a broker thread blocked for a remote handle checks that its peer is
/// still there.
const PEER_CHECK: Duration = Duration::from_millis(100);

/// How many idle connections a remote handle keeps for its next requests; one past
/// that is closed when its request ends. A handle holds one connection per request
/// in flight (one per thread using it at once), so this only bounds what a burst of
/// threads leaves open after it.
const IDLE_CONNECTIONS: usize = 16;

/// A multi-producer, multi-consumer queue between the processes of a job: Python's
/// `multiprocessing.Queue`, typed.
///
/// Clone it, or put it inside the argument of [`Process::spawn`](crate::Process::spawn)
/// or the items of a pool task, and every holder (the creating process, its
/// children, their children: siblings too) puts and gets on the same queue. Each
/// item goes to exactly one consumer, once. [`close`](Queue::close) tells consumers
/// that no more will come: they drain what is left, then get
/// [`Error::QueueClosed`], with no sentinel value.
///
/// One handle may be used from many threads at once (it is `Sync`): in a process
/// other than the creator, each call in flight has a connection of its own, so a
/// thread waiting in [`get`](Queue::get) never holds up another thread's
/// [`put`](Queue::put). The handle keeps those connections for its next calls and
/// closes them when dropped.
///
/// The items are kept in the process that created the queue. Keep a handle there
/// (the creator's own `Queue`) until the other processes are done with it: when
/// the creator's last handle and last connection are gone, the queue is gone.
///
/// A [`SharedSlice`](crate::SharedSlice) or [`Shared`](crate::Shared) inside an
/// item stays valid however long the item waits and whoever takes it, even once
/// the producer dropped its handle or exited: the queue keeps copies of the
/// descriptors of the inputs an item names, with the item, until it is taken (and
/// acknowledged). A [`SharedSlice::map_file`](crate::SharedSlice::map_file) slice is
/// refused by [`put`](Queue::put) with [`Error::EncodeItem`] (its file is not
/// sealed, so only its pool's workers may map it).
///
/// Only processes of the same user that descend from the creator can connect, and
/// only with the secret inside a handle. Nothing is left on disk.
///
/// Each item reaches exactly one `get` that returns it, even when consumers die.
/// The creating process keeps an item it hands to a consumer in another process
/// until that consumer acknowledges it: the consumer reads and decodes the item,
/// then writes a small acknowledgement on the same connection before its `get`
/// returns (no answer is awaited: one small write per item). If the connection
/// drops first (the consumer's process is killed, or dies, inside the `get`), the
/// item goes back to the front of the queue and the next `get`, in any process,
/// takes it: ahead of the items that were behind it, so the order is first in,
/// first out, except that items other consumers took meanwhile went first. A Unix
/// socket keeps what was written even when its writer dies at once, so the only
/// moment left is between that write and the return, where none of the caller's
/// code runs. What a consumer does with an item once `get` returned is its own: an
/// item is not given back if its consumer dies while working on it (that would be
/// at-least-once delivery, with an acknowledgement from the caller's code).
///
/// A bounded queue counts the items handed over and not yet acknowledged against
/// its capacity, so an item that comes back always has its place; a producer
/// waiting for room is woken by the acknowledgement. After [`close`](Queue::close),
/// consumers also drain items that come back: while one handed over may still come
/// back, a [`get`](Queue::get) waits (a [`try_get`](Queue::try_get) says
/// [`Error::QueueEmpty`], a [`get_timeout`](Queue::get_timeout) times out), and
/// [`Error::QueueClosed`] comes once none is out.
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let queue = multiproc::Queue::<String>::unbounded();
///     let writer = multiproc::Process::spawn(queue.clone(), |q: multiproc::Queue<String>| {
///         for word in ["A", "B", "C"] {
///             q.put(word.to_string()).unwrap();
///         }
///     })?;
///     writer.join()?;
///     assert_eq!(queue.get()?, "A");
///     Ok(())
/// }
/// ```
pub struct Queue<T> {
    route: Route,
    _items: PhantomData<fn(T) -> T>,
}

enum Route {
    Local {
        state: Arc<State>,
        id: u64,
    },
    Remote {
        address: Address,
        id: u64,
        /// Connections with no request in flight, the last used on top.
        idle: Mutex<Vec<UnixStream>>,
    },
}

/// How long an operation may wait.
#[derive(Debug, Clone, Copy)]
enum Wait {
    Try,
    For(Duration),
    Forever,
}

impl Wait {
    fn encode(self) -> u64 {
        match self {
            Wait::Try => 0,
            Wait::For(d) => u64::try_from(d.as_nanos()).unwrap_or(FOREVER - 1).max(1),
            Wait::Forever => FOREVER,
        }
    }

    fn decode(wait: u64) -> Self {
        match wait {
            0 => Wait::Try,
            FOREVER => Wait::Forever,
            nanos => Wait::For(Duration::from_nanos(nanos)),
        }
    }
}

/// Why an operation did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Full,
    Empty,
    TimedOut,
    Closed,
    /// A remote handle's process went away while its broker thread waited.
    PeerGone,
}

/// The queue itself, in the creating process.
struct State {
    inner: Mutex<Inner>,
    not_empty: Condvar,
    not_full: Condvar,
    /// Rendezvous only: a consumer took an offered item, or left without one.
    taken: Condvar,
    /// `Some(0)` is a rendezvous: an item is only ever offered by a producer that
    /// waits until a consumer takes it.
    capacity: Option<usize>,
}

struct Inner {
    items: VecDeque<Entry>,
    closed: bool,
    /// Rendezvous only: consumers inside a blocking or timed get (a broker thread
    /// stands for a remote one), the ones a `try_put` can hand an item to.
    waiting_gets: usize,
    /// Rendezvous only: the number of the next offer.
    next_offer: u64,
    /// Items handed to remote consumers and not yet acknowledged: each is held by
    /// the broker thread of its connection, and comes back to the front if that
    /// connection drops first. A bounded queue counts them against its capacity,
    /// and a closed queue is not drained while one may still come back.
    handed: usize,
}

struct Entry {
    /// Rendezvous only: the number of the offer whose producer waits for this item
    /// to be taken; `None` for an item nobody waits for.
    offer: Option<u64>,
    item: Item,
}

/// An item as the queue holds it: its encoding, and copies of the descriptors of
/// the shared inputs it names, so that it decodes wherever and whenever it is
/// taken, whether or not its producer still holds them.
struct Item {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// The queues of this process that other processes may reach.
static QUEUES: Mutex<Option<HashMap<u64, Weak<State>>>> = Mutex::new(None);

impl Inner {
    /// What a bounded queue counts against its capacity: the items waiting and the
    /// ones handed over and not yet acknowledged.
    fn held(&self) -> usize {
        self.items.len() + self.handed
    }
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(
        &self,
        item: Item,
        wait: Wait,
        alive: &dyn Fn() -> bool,
    ) -> std::result::Result<(), Refusal> {
        if self.capacity == Some(0) {
            return self.hand_over(item, wait, alive);
        }
        let deadline = deadline(wait);
        let mut polled = false;
        let mut inner = self.lock();
        loop {
            if inner.closed {
                return Err(Refusal::Closed);
            }
            if self.capacity.is_none_or(|cap| inner.held() < cap) {
                inner.items.push_back(Entry { offer: None, item });
                drop(inner);
                self.not_empty.notify_one();
                return Ok(());
            }
            if !polled && !matches!(wait, Wait::Try) {
                polled = true;
                drop(inner);
                self.poll(|inner| {
                    inner.closed || self.capacity.is_none_or(|cap| inner.held() < cap)
                });
                inner = self.lock();
                continue;
            }
            inner = self.wait(&self.not_full, inner, wait, deadline, alive, Refusal::Full)?;
        }
    }

    /// A rendezvous put: offers the item and returns once a consumer has taken it.
    /// An offer that ends otherwise (closed, timed out, no consumer waiting for a
    /// `try_put`, its remote producer gone) is withdrawn, so the item is delivered
    /// exactly when the put returns `Ok`.
    fn hand_over(
        &self,
        item: Item,
        wait: Wait,
        alive: &dyn Fn() -> bool,
    ) -> std::result::Result<(), Refusal> {
        let deadline = deadline(wait);
        let try_only = matches!(wait, Wait::Try);
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refusal::Closed);
        }
        if try_only && inner.items.len() >= inner.waiting_gets {
            return Err(Refusal::Full);
        }
        let offer = inner.next_offer;
        inner.next_offer += 1;
        inner.items.push_back(Entry {
            offer: Some(offer),
            item,
        });
        self.not_empty.notify_one();
        let position = |inner: &Inner| inner.items.iter().position(|e| e.offer == Some(offer));
        // A `try_put` waits only while a waiting consumer is there to take its
        // item (each takes the front one): that consumer is awake and about to.
        let wait = if try_only { Wait::Forever } else { wait };
        let mut polled = false;
        loop {
            let Some(at) = position(&inner) else {
                return Ok(());
            };
            let refused = if inner.closed {
                Some(Refusal::Closed)
            } else if try_only && at >= inner.waiting_gets {
                Some(Refusal::Full)
            } else {
                None
            };
            if let Some(refusal) = refused {
                inner.items.remove(at);
                return Err(refusal);
            }
            if !polled {
                polled = true;
                drop(inner);
                self.poll(|inner| {
                    inner.closed
                        || position(inner).is_none_or(|at| try_only && at >= inner.waiting_gets)
                });
                inner = self.lock();
                continue;
            }
            inner = match self.wait(&self.taken, inner, wait, deadline, alive, Refusal::Full) {
                Ok(inner) => inner,
                Err(refusal) => {
                    let mut inner = self.lock();
                    return match position(&inner) {
                        None => Ok(()),
                        Some(at) => {
                            inner.items.remove(at);
                            Err(refusal)
                        }
                    };
                }
            };
        }
    }

    /// Takes the next item. With `hand`, for a remote consumer, the item counts as
    /// handed over until [`State::acknowledge`] or [`State::give_back`].
    fn get(
        &self,
        wait: Wait,
        alive: &dyn Fn() -> bool,
        hand: bool,
    ) -> std::result::Result<Item, Refusal> {
        // A rendezvous `try_put` hands its item only to a consumer that waits.
        let counted = self.capacity == Some(0) && !matches!(wait, Wait::Try);
        if counted {
            self.lock().waiting_gets += 1;
        }
        let got = self.take(wait, alive, hand);
        if counted {
            self.lock().waiting_gets -= 1;
            self.taken.notify_all();
        }
        got
    }

    fn take(
        &self,
        wait: Wait,
        alive: &dyn Fn() -> bool,
        hand: bool,
    ) -> std::result::Result<Item, Refusal> {
        let deadline = deadline(wait);
        let mut polled = false;
        let mut inner = self.lock();
        loop {
            // Once closed, what is left is drained, but not a rendezvous offer: its
            // producer withdraws it and fails.
            let next = if inner.closed {
                inner.items.iter().position(|e| e.offer.is_none())
            } else if inner.items.is_empty() {
                None
            } else {
                Some(0)
            };
            if let Some(entry) = next.and_then(|at| inner.items.remove(at)) {
                if hand {
                    inner.handed += 1;
                }
                drop(inner);
                if self.capacity == Some(0) {
                    self.taken.notify_all();
                } else if !hand {
                    // A handed item keeps its place until it is acknowledged.
                    self.not_full.notify_one();
                }
                return Ok(entry.item);
            }
            // An item handed over may still come back: a closed queue is drained
            // only once none is out.
            if inner.closed && inner.handed == 0 {
                return Err(Refusal::Closed);
            }
            if !polled && !matches!(wait, Wait::Try) {
                polled = true;
                drop(inner);
                self.poll(|inner| inner.closed || !inner.items.is_empty());
                inner = self.lock();
                continue;
            }
            inner = self.wait(
                &self.not_empty,
                inner,
                wait,
                deadline,
                alive,
                Refusal::Empty,
            )?;
        }
    }

    /// Looks for `ready` for a short while before the caller blocks on a condition
    /// variable: a thread woken from a blocked wait on this VM takes tens of
    /// microseconds or more (see `poll::poll_before_blocking`).
    fn poll(&self, ready: impl Fn(&Inner) -> bool) {
        poll::poll_before_blocking(|| ready(&self.lock()).then_some(()));
    }

    /// A remote consumer read the item it was handed: its place is free.
    fn acknowledge(&self) {
        let closed = {
            let mut inner = self.lock();
            inner.handed -= 1;
            inner.closed
        };
        self.settled(closed, false);
    }

    /// An item handed over was not read (its consumer's connection dropped, or the
    /// answer could not be written): it goes back to the front, the next one taken.
    fn give_back(&self, item: Item) {
        let closed = {
            let mut inner = self.lock();
            inner.handed -= 1;
            inner.items.push_front(Entry { offer: None, item });
            inner.closed
        };
        self.settled(closed, true);
    }

    /// Wakes whoever waits for a handed item to settle: a producer for its place;
    /// after `close`, every consumer, since the last one out ends the drain.
    fn settled(&self, closed: bool, returned: bool) {
        if closed {
            self.not_empty.notify_all();
        } else if returned {
            self.not_empty.notify_one();
        }
        if self.capacity == Some(0) {
            self.taken.notify_all();
        } else {
            self.not_full.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
        self.taken.notify_all();
    }

    fn wait<'a>(
        &self,
        condvar: &Condvar,
        inner: MutexGuard<'a, Inner>,
        wait: Wait,
        deadline: Option<Instant>,
        alive: &dyn Fn() -> bool,
        now_refusal: Refusal,
    ) -> std::result::Result<MutexGuard<'a, Inner>, Refusal> {
        let slice = match (wait, deadline) {
            (Wait::Try, _) => return Err(now_refusal),
            (_, Some(deadline)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Refusal::TimedOut);
                }
                left.min(PEER_CHECK)
            }
            (_, None) => PEER_CHECK,
        };
        let (inner, timeout) = condvar
            .wait_timeout(inner, slice)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() && !alive() {
            return Err(Refusal::PeerGone);
        }
        Ok(inner)
    }
}

fn deadline(wait: Wait) -> Option<Instant> {
    match wait {
        Wait::For(d) => Instant::now().checked_add(d),
        _ => None,
    }
}

impl<T> Queue<T> {
    /// A queue holding at most `capacity` items: [`put`](Queue::put) waits while
    /// `capacity` items wait to be taken.
    ///
    /// A capacity of 0 makes a rendezvous, as `crossbeam_channel::bounded(0)` and
    /// `std::sync::mpsc::sync_channel(0)` do: nothing is held, and each put hands its
    /// item straight to a consumer. [`put`](Queue::put) returns only once a consumer
    /// (in any process) has taken the item; [`try_put`](Queue::try_put) succeeds only
    /// when a consumer is waiting in [`get`](Queue::get) or
    /// [`get_timeout`](Queue::get_timeout) at that moment, and
    /// [`put_timeout`](Queue::put_timeout) when one takes it in time. A put that
    /// fails (full, timed out, closed) has withdrawn its item: no consumer gets it.
    /// A [`try_get`](Queue::try_get) takes the item of a producer waiting in a put.
    /// [`close`](Queue::close) fails the puts still waiting. (Python's
    /// `Queue(maxsize=0)` means unbounded: that is [`Queue::unbounded`].) A Rust
    /// user reads `bounded(0)` as crossbeam's rendezvous, and quietly holding one
    /// item instead would let a producer run ahead of every consumer.
    ///
    /// Taken means handed to a consumer: if that consumer dies before it read the
    /// item, the item comes back to the front and the next consumer gets it, as in
    /// any queue (the put has returned by then).
    pub fn bounded(capacity: usize) -> Self {
        Self::new(Some(capacity))
    }

    /// A queue with no bound: [`put`](Queue::put) never waits.
    pub fn unbounded() -> Self {
        Self::new(None)
    }

    fn new(capacity: Option<usize>) -> Self {
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                closed: false,
                waiting_gets: 0,
                next_offer: 0,
                handed: 0,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            taken: Condvar::new(),
            capacity,
        });
        let id = broker::next_id();
        let mut queues = QUEUES.lock().unwrap_or_else(|p| p.into_inner());
        let queues = queues.get_or_insert_with(HashMap::new);
        queues.retain(|_, q| q.strong_count() > 0);
        queues.insert(id, Arc::downgrade(&state));
        Queue {
            route: Route::Local { state, id },
            _items: PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// Adds an item, waiting while a bounded queue is full.
    ///
    /// # Errors
    ///
    /// [`Error::QueueClosed`] once the queue is closed, [`Error::EncodeItem`] when the
    /// item does not encode, [`Error::QueueLost`] when the creating process cannot be
    /// reached.
    pub fn put(&self, item: T) -> Result<()> {
        self.put_with(item, Wait::Forever)
    }

    /// Adds an item if there is room now.
    ///
    /// # Errors
    ///
    /// [`Error::QueueFull`] when a bounded queue is full; otherwise as
    /// [`put`](Queue::put).
    pub fn try_put(&self, item: T) -> Result<()> {
        self.put_with(item, Wait::Try)
    }

    /// Adds an item, waiting at most `timeout` for room.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when there was no room in time; otherwise as
    /// [`put`](Queue::put).
    pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<()> {
        self.put_with(item, Wait::For(timeout))
    }

    /// Takes the next item, waiting for one.
    ///
    /// # Errors
    ///
    /// [`Error::QueueClosed`] once the queue is closed and empty, [`Error::QueueLost`]
    /// when the creating process cannot be reached, [`Error::DecodeItem`] when the
    /// item does not decode as `T`.
    pub fn get(&self) -> Result<T> {
        self.get_with(Wait::Forever)
    }

    /// Takes the next item if there is one now.
    ///
    /// # Errors
    ///
    /// [`Error::QueueEmpty`] when there is none; otherwise as [`get`](Queue::get).
    pub fn try_get(&self) -> Result<T> {
        self.get_with(Wait::Try)
    }

    /// Takes the next item, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when none came in time; otherwise as [`get`](Queue::get).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.get_with(Wait::For(timeout))
    }

    /// Closes the queue for every holder: later puts fail, blocked puts fail, and
    /// consumers get [`Error::QueueClosed`] once they have taken what is left.
    ///
    /// # Errors
    ///
    /// [`Error::QueueLost`] when the creating process cannot be reached.
    pub fn close(&self) -> Result<()> {
        match &self.route {
            Route::Local { state, .. } => {
                state.close();
                Ok(())
            }
            Route::Remote { .. } => self.request(CLOSE, Wait::Try, &Item::none(), |_| ()),
        }
    }

    fn put_with(&self, item: T, wait: Wait) -> Result<()> {
        let mut bytes = Vec::new();
        let (encoded, pins) = region::pin_while(|| codec::encode_into(&item, &mut bytes));
        encoded.map_err(|source| Error::EncodeItem { item: 0, source })?;
        // The shared inputs the item names travel with it, so it decodes after the
        // producer dropped them, in whichever process takes it.
        let fds = if pins.is_empty() {
            Vec::new()
        } else {
            pins.carried().map_err(|fault| Error::EncodeItem {
                item: 0,
                source: CodecError(format!("the item cannot go through a queue: {fault}")),
            })?
        };
        let item = Item { bytes, fds };
        match &self.route {
            Route::Local { state, .. } => state
                .put(item, wait, &|| true)
                .map_err(|r| refusal(r, wait)),
            Route::Remote { .. } => self.request(PUT, wait, &item, |_| ()),
        }
    }

    fn get_with(&self, wait: Wait) -> Result<T> {
        let decode = |item: &Item| {
            region::with_carried(&item.fds, || codec::decode(&item.bytes)).map_err(|source| {
                Error::DecodeItem {
                    item: 0,
                    worker: None,
                    source,
                }
            })
        };
        match &self.route {
            Route::Local { state, .. } => {
                let item = state
                    .get(wait, &|| true, false)
                    .map_err(|r| refusal(r, wait))?;
                decode(&item)
            }
            // Decoded before the acknowledgement, so the item is acknowledged only
            // once nothing but the return stands between it and the caller.
            Route::Remote { .. } => self.request(GET, wait, &Item::none(), decode)?,
        }
    }

    /// One request to the creator's broker; the payload of its answer. A `GET`
    /// answered with an item is acknowledged (see [`serve`]) once `open` has read
    /// the item; `open` gives what the call returns.
    fn request<R>(
        &self,
        tag: u8,
        wait: Wait,
        payload: &Item,
        open: impl FnOnce(&Item) -> R,
    ) -> Result<R> {
        let Route::Remote { address, id, idle } = &self.route else {
            return Err(Error::Config("a local queue has no connection"));
        };
        let lost = |source: io::Error| Error::QueueLost {
            creator: address.creator,
            source,
        };
        // Taken out for the whole request, so that another thread's request on this
        // handle uses another connection instead of waiting for this answer.
        let taken = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut stream = match taken {
            Some(stream) => stream,
            None => broker::connect(address, *id).map_err(lost)?,
        };
        // On an error the stream may hold half a frame: it is dropped, not kept.
        write_frame(&mut stream, tag, wait.encode(), payload).map_err(lost)?;
        if tag == GET && DIE_BEFORE_READING.load(Ordering::Relaxed) {
            // Fault injection: the answer is on its way or here, and this process
            // dies before reading a byte of it.
            let _ = socket::wait_readable(&stream, None);
            signals::kill_self();
        }
        poll_readable(&stream);
        let (answer, _, got) = read_frame(&mut stream).map_err(lost)?;
        let answer = match answer {
            OK => Ok(open(&got)),
            ITEM => {
                let item = open(&got);
                // One small write, no answer awaited. Its broker thread waits for
                // it and leaves only with the queue's process, so if it fails
                // nobody else can get the item: the caller keeps it, and the
                // connection is dropped.
                if write_frame(&mut stream, ACK, 0, &Item::none()).is_err() {
                    return Ok(item);
                }
                Ok(item)
            }
            FULL => Err(refusal(Refusal::Full, wait)),
            EMPTY => Err(refusal(Refusal::Empty, wait)),
            TIMED_OUT => Err(refusal(Refusal::TimedOut, wait)),
            CLOSED => Err(refusal(Refusal::Closed, wait)),
            other => {
                return Err(lost(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected answer {other}"),
                )));
            }
        };
        let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(stream);
        }
        answer
    }
}

fn refusal(refusal: Refusal, wait: Wait) -> Error {
    match refusal {
        Refusal::Full => Error::QueueFull,
        Refusal::Empty => Error::QueueEmpty,
        Refusal::Closed => Error::QueueClosed,
        Refusal::TimedOut | Refusal::PeerGone => Error::Timeout(match wait {
            Wait::For(d) => d,
            _ => Duration::ZERO,
        }),
    }
}

/// Serves one remote handle's connection in the creating process, until it hangs up.
fn serve(id: u64, mut stream: UnixStream) {
    let state = QUEUES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|queues| queues.get(&id))
        .and_then(Weak::upgrade);
    if broker::answer(&mut stream, state.is_some()).is_err() {
        return;
    }
    let Some(state) = state else {
        return;
    };
    let peer = match stream.try_clone() {
        Ok(peer) => peer,
        Err(_) => return,
    };
    let alive = move || peer_alive(&peer);
    // The item this connection was handed last, until its consumer acknowledges it;
    // dropped with the connection (any return below), it goes back to the queue.
    let mut handed = Handed {
        state: &state,
        item: None,
    };
    loop {
        // A producer or consumer in a loop sends its next request at once.
        poll_readable(&stream);
        let Ok((tag, wait, payload)) = read_frame(&mut stream) else {
            return;
        };
        // The client reads a whole answer before it writes again, so any frame
        // after an item says it was read (a live consumer sends `ACK` at once).
        if handed.item.take().is_some() {
            state.acknowledge();
        }
        if tag == ACK {
            continue;
        }
        let wait = Wait::decode(wait);
        let sent = match tag {
            PUT => match state.put(payload, wait, &alive) {
                Ok(()) => write_frame(&mut stream, OK, 0, &Item::none()),
                Err(r) => write_refusal(&mut stream, r),
            },
            GET => match state.get(wait, &alive, true) {
                Ok(item) => {
                    let sent = write_frame(&mut stream, ITEM, 0, &item);
                    // Written or not, it is not read yet: held until acknowledged.
                    handed.item = Some(item);
                    sent
                }
                Err(r) => write_refusal(&mut stream, r),
            },
            CLOSE => {
                state.close();
                write_frame(&mut stream, OK, 0, &Item::none())
            }
            _ => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// The item a connection's consumer was handed and has not acknowledged.
struct Handed<'a> {
    state: &'a State,
    item: Option<Item>,
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.state.give_back(item);
        }
    }
}

/// Polls `stream` briefly for something to read, so that a reply or request that
/// follows at once is read without blocking (and without the slow wake-up that
/// follows a block on this VM); returns either way, the caller then reads.
fn poll_readable(stream: &UnixStream) {
    poll::poll_before_blocking(|| {
        matches!(
            socket::wait_readable(stream, Some(Duration::ZERO)),
            Ok(true) | Err(_)
        )
        .then_some(())
    });
}

fn write_refusal(stream: &mut UnixStream, refusal: Refusal) -> io::Result<()> {
    let tag = match refusal {
        Refusal::Full => FULL,
        Refusal::Empty => EMPTY,
        Refusal::TimedOut => TIMED_OUT,
        Refusal::Closed => CLOSED,
        Refusal::PeerGone => {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone"));
        }
    };
    write_frame(stream, tag, 0, &Item::none())
}

/// Whether the process at the other end of `stream` still holds it open (it has
/// sent nothing while it waits for an answer, so readable means end-of-file).
fn peer_alive(stream: &UnixStream) -> bool {
    !matches!(
        socket::wait_readable(stream, Some(Duration::ZERO)),
        Ok(true) | Err(_)
    )
}

/// Writes one frame: `length (u32) | tag (u8) | wait (u64) | descriptors (u16) |
/// payload`, then, when the item carries descriptors, one byte with them attached
/// (SCM_RIGHTS). The reader reads exactly the frame's bytes before it receives
/// that byte, so a plain read never swallows the descriptors.
fn write_frame(stream: &mut UnixStream, tag: u8, wait: u64, item: &Item) -> io::Result<()> {
    let payload = &item.bytes;
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "item larger than 4 GiB"))?;
    let fds = u16::try_from(item.fds.len())
        .ok()
        .filter(|&n| usize::from(n) <= socket::MAX_FDS)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"))?;
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4] = tag;
    header[5..13].copy_from_slice(&wait.to_le_bytes());
    header[13..].copy_from_slice(&fds.to_le_bytes());
    if payload.len() <= 4096 {
        let mut frame = Vec::with_capacity(HEADER + payload.len());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(payload);
        stream.write_all(&frame)?;
    } else {
        stream.write_all(&header)?;
        stream.write_all(payload)?;
    }
    if fds > 0 {
        let raw: Vec<RawFd> = item.fds.iter().map(AsRawFd::as_raw_fd).collect();
        socket::send_fds(stream, 0, &raw)?;
    }
    Ok(())
}

fn read_frame(stream: &mut UnixStream) -> io::Result<(u8, u64, Item)> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let wait = u64::from_le_bytes(header[5..13].try_into().expect("8 bytes"));
    let count = usize::from(u16::from_le_bytes(
        header[13..].try_into().expect("2 bytes"),
    ));
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes)?;
    let fds = if count > 0 {
        let (_, fds) = socket::recv_fds(stream)?;
        if fds.len() != count {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} descriptors came where the frame announced {count}",
                    fds.len()
                ),
            ));
        }
        fds
    } else {
        Vec::new()
    };
    Ok((header[4], wait, Item { bytes, fds }))
}

/// The length of a frame's header.
const HEADER: usize = 15;

impl Item {
    /// No payload (a request or an answer that carries no item).
    fn none() -> Self {
        Item {
            bytes: Vec::new(),
            fds: Vec::new(),
        }
    }
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        let route = match &self.route {
            Route::Local { state, id } => Route::Local {
                state: Arc::clone(state),
                id: *id,
            },
            Route::Remote { address, id, .. } => Route::Remote {
                address: *address,
                id: *id,
                idle: Mutex::new(Vec::new()),
            },
        };
        Queue {
            route,
            _items: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.route {
            Route::Local { id, .. } => f.debug_struct("Queue").field("id", id).finish(),
            Route::Remote { address, id, .. } => f
                .debug_struct("Queue")
                .field("id", id)
                .field("creator", &address.creator)
                .finish(),
        }
    }
}

/// What a queue handle becomes on the wire.
#[derive(Serialize, Deserialize)]
struct Wire {
    address: Address,
    id: u64,
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let wire = match &self.route {
            Route::Local { id, .. } => Wire {
                address: broker::address(Some(serve)).map_err(serde::ser::Error::custom)?,
                id: *id,
            },
            Route::Remote { address, id, .. } => Wire {
                address: *address,
                id: *id,
            },
        };
        wire.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        // Back in the creating process: use the queue directly.
        if wire.address.is_own() {
            let state = QUEUES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .and_then(|queues| queues.get(&wire.id))
                .and_then(Weak::upgrade);
            if let Some(state) = state {
                return Ok(Queue {
                    route: Route::Local { state, id: wire.id },
                    _items: PhantomData,
                });
            }
        }
        Ok(Queue {
            route: Route::Remote {
                address: wire.address,
                id: wire.id,
                idle: Mutex::new(Vec::new()),
            },
            _items: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue's state, to see what a thread blocked in it is doing.
    fn state(queue: &Queue<u64>) -> &State {
        match &queue.route {
            Route::Local { state, .. } => state,
            Route::Remote { .. } => panic!("a local queue"),
        }
    }

    /// Yields until `ready` holds of the queue's state; a hang guard, not a timer.
    fn until(queue: &Queue<u64>, ready: impl Fn(&Inner) -> bool) -> MutexGuard<'_, Inner> {
        let guard = Instant::now() + Duration::from_secs(30);
        loop {
            let inner = state(queue).lock();
            if ready(&inner) {
                return inner;
            }
            drop(inner);
            assert!(Instant::now() < guard, "the other thread never got there");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_rendezvous_put_returns_only_once_a_consumer_took_the_item() {
        let queue = Queue::<u64>::bounded(0);
        let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let producer = {
            let (queue, returned) = (queue.clone(), Arc::clone(&returned));
            std::thread::spawn(move || {
                let put = queue.put(1);
                returned.store(true, std::sync::atomic::Ordering::SeqCst);
                put
            })
        };
        // While the offer is in the queue (seen under its lock), the put cannot
        // have returned: it returns only after seeing its offer gone.
        let inner = until(&queue, |inner| !inner.items.is_empty());
        assert!(!returned.load(std::sync::atomic::Ordering::SeqCst));
        drop(inner);
        assert_eq!(queue.get().unwrap(), 1);
        producer.join().unwrap().unwrap();
        assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
    }

    #[test]
    fn a_rendezvous_try_put_needs_a_waiting_consumer() {
        let queue = Queue::<u64>::bounded(0);
        assert!(matches!(queue.try_put(1), Err(Error::QueueFull)));
        assert!(matches!(
            queue.put_timeout(2, Duration::from_millis(1)),
            Err(Error::Timeout(_))
        ));
        // Both were withdrawn: nothing is held.
        assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
        let consumer = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.get())
        };
        drop(until(&queue, |inner| inner.waiting_gets == 1));
        queue.try_put(3).unwrap();
        assert_eq!(consumer.join().unwrap().unwrap(), 3);
        assert!(matches!(queue.try_put(4), Err(Error::QueueFull)));
    }

    #[test]
    fn closing_a_rendezvous_fails_the_put_waiting_in_it_and_drops_its_item() {
        let queue = Queue::<u64>::bounded(0);
        let producer = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.put(1))
        };
        drop(until(&queue, |inner| !inner.items.is_empty()));
        queue.close().unwrap();
        assert!(matches!(producer.join().unwrap(), Err(Error::QueueClosed)));
        assert!(matches!(queue.try_get(), Err(Error::QueueClosed)));
        assert!(state(&queue).lock().items.is_empty());
    }

    /// A handle to `queue` that goes through the rendezvous of this very process, as
    /// a handle decoded in another process would.
    fn remote(queue: &Queue<u64>) -> Queue<u64> {
        let Route::Local { id, .. } = &queue.route else {
            panic!("not a local queue");
        };
        Queue {
            route: Route::Remote {
                address: broker::address(Some(serve)).unwrap(),
                id: *id,
                idle: Mutex::new(Vec::new()),
            },
            _items: PhantomData,
        }
    }

    fn idle(queue: &Queue<u64>) -> usize {
        let Route::Remote { idle, .. } = &queue.route else {
            panic!("not a remote queue");
        };
        idle.lock().unwrap().len()
    }

    #[test]
    fn a_remote_handle_reuses_one_connection_for_calls_one_after_another() {
        let queue = Queue::<u64>::bounded(4);
        let handle = remote(&queue);
        for i in 0..100 {
            handle.put(i).unwrap();
            assert_eq!(handle.get().unwrap(), i);
        }
        assert!(matches!(handle.try_get(), Err(Error::QueueEmpty)));
        assert_eq!(idle(&handle), 1);
    }

    /// A connection to `queue`'s rendezvous that asks for an item and reads
    /// nothing yet: the item is handed over and sits unread in the socket.
    fn ask_without_reading(queue: &Queue<u64>) -> UnixStream {
        let Route::Local { id, .. } = &queue.route else {
            panic!("not a local queue");
        };
        let address = broker::address(Some(serve)).unwrap();
        let mut stream = broker::connect(&address, *id).unwrap();
        write_frame(&mut stream, GET, FOREVER, &Item::none()).unwrap();
        let answered = socket::wait_readable(&stream, Some(Duration::from_secs(30))).unwrap();
        assert!(answered, "the item was never sent");
        stream
    }

    #[test]
    fn an_item_handed_over_and_not_read_comes_back_to_the_front() {
        let queue = Queue::<u64>::unbounded();
        for i in 1..=3 {
            queue.put(i).unwrap();
        }
        let unread = ask_without_reading(&queue);
        assert_eq!(state(&queue).lock().handed, 1);
        drop(unread);
        drop(until(&queue, |inner| inner.handed == 0));
        let got: Vec<u64> = (0..3).map(|_| queue.try_get().unwrap()).collect();
        assert_eq!(got, [1, 2, 3]);
    }

    #[test]
    fn a_closed_queue_is_drained_of_an_item_that_comes_back_before_it_reports_closed() {
        let queue = Queue::<u64>::unbounded();
        queue.put(1).unwrap();
        queue.put(2).unwrap();
        let unread = ask_without_reading(&queue);
        queue.close().unwrap();
        assert_eq!(queue.try_get().unwrap(), 2);
        // Item 1 is out and may come back: empty for now, not closed.
        assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
        assert!(matches!(
            queue.get_timeout(Duration::from_millis(1)),
            Err(Error::Timeout(_))
        ));
        let waiting = {
            let queue = queue.clone();
            std::thread::spawn(move || (queue.get().unwrap(), queue.get()))
        };
        drop(unread);
        let (first, then) = waiting.join().unwrap();
        assert_eq!(first, 1);
        assert!(matches!(then, Err(Error::QueueClosed)));
    }

    #[test]
    fn a_handed_item_keeps_its_place_in_a_bounded_queue_until_acknowledged() {
        let queue = Queue::<u64>::bounded(1);
        queue.put(1).unwrap();
        let mut unread = ask_without_reading(&queue);
        assert!(matches!(queue.try_put(2), Err(Error::QueueFull)));
        let (tag, _, item) = read_frame(&mut unread).unwrap();
        assert_eq!((tag, codec::decode::<u64>(&item.bytes).unwrap()), (ITEM, 1));
        write_frame(&mut unread, ACK, 0, &Item::none()).unwrap();
        drop(until(&queue, |inner| inner.handed == 0));
        queue.try_put(2).unwrap();
        // Acknowledged: closing its connection does not bring it back.
        drop(unread);
        assert_eq!(queue.get().unwrap(), 2);
        assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
    }
}
