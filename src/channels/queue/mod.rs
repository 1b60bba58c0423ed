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

mod frame;
mod server;
mod state;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::channels::broker::{self, Address};
use crate::error::{CodecError, Error, Result};
use crate::os::{signals, socket};
use crate::shared::region;
use crate::wire::codec;

use frame::{
    ACK, CLOSE, CLOSED, EMPTY, FULL, GET, ITEM, OK, PUT, TIMED_OUT, poll_readable, read_frame,
    write_frame,
};
use server::serve;
use state::{Inner, Item, QUEUES, Refusal, State, Wait};

/// Fault injection for tests: the next remote `get` of this process kills it once
/// its answer is on the way, before reading it.
static DIE_BEFORE_READING: AtomicBool = AtomicBool::new(false);

/// Makes this process die (SIGKILL) in its next remote `get`, after the creator
/// sent the answer and before a byte of it is read: the moment an item handed over
/// would be lost without acknowledgements.
pub(crate) fn die_before_reading_next_item() {
    DIE_BEFORE_READING.store(true, Ordering::Relaxed);
}

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
    use std::sync::MutexGuard;
    use std::time::Instant;

    use super::state::FOREVER;
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
