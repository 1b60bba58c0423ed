//! The queue itself, in the creating process: its items, capacity and waiters,
//! and how long an operation may wait.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::os::poll;

/// `wait` value meaning "as long as it takes".
pub(super) const FOREVER: u64 = u64::MAX;

/// How often a broker thread blocked for a remote handle checks that its peer is
/// still there.
pub(super) const PEER_CHECK: Duration = Duration::from_millis(100);

/// How long an operation may wait.
#[derive(Debug, Clone, Copy)]
pub(super) enum Wait {
    Try,
    For(Duration),
    Forever,
}

impl Wait {
    pub(super) fn encode(self) -> u64 {
        match self {
            Wait::Try => 0,
            Wait::For(d) => u64::try_from(d.as_nanos()).unwrap_or(FOREVER - 1).max(1),
            Wait::Forever => FOREVER,
        }
    }

    pub(super) fn decode(wait: u64) -> Self {
        match wait {
            0 => Wait::Try,
            FOREVER => Wait::Forever,
            nanos => Wait::For(Duration::from_nanos(nanos)),
        }
    }
}

/// Why an operation did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Full,
    Empty,
    TimedOut,
    Closed,
    /// A remote handle's process went away while its broker thread waited.
    PeerGone,
}

/// The queue itself, in the creating process.
pub(super) struct State {
    pub(super) inner: Mutex<Inner>,
    pub(super) not_empty: Condvar,
    pub(super) not_full: Condvar,
    /// Rendezvous only: a consumer took an offered item, or left without one.
    pub(super) taken: Condvar,
    /// `Some(0)` is a rendezvous: an item is only ever offered by a producer that
    /// waits until a consumer takes it.
    pub(super) capacity: Option<usize>,
}

pub(super) struct Inner {
    pub(super) items: VecDeque<Entry>,
    pub(super) closed: bool,
    /// Rendezvous only: consumers inside a blocking or timed get (a broker thread
    /// stands for a remote one), the ones a `try_put` can hand an item to.
    pub(super) waiting_gets: usize,
    /// Rendezvous only: the number of the next offer.
    pub(super) next_offer: u64,
    /// Items handed to remote consumers and not yet acknowledged: each is held by
    /// the broker thread of its connection, and comes back to the front if that
    /// connection drops first. A bounded queue counts them against its capacity,
    /// and a closed queue is not drained while one may still come back.
    pub(super) handed: usize,
}

pub(super) struct Entry {
    /// Rendezvous only: the number of the offer whose producer waits for this item
    /// to be taken; `None` for an item nobody waits for.
    pub(super) offer: Option<u64>,
    pub(super) item: Item,
}

/// An item as the queue holds it: its encoding, and copies of the descriptors of
/// the shared inputs it names, so that it decodes wherever and whenever it is
/// taken, whether or not its producer still holds them.
pub(super) struct Item {
    pub(super) bytes: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
}

/// The queues of this process that other processes may reach.
pub(super) static QUEUES: Mutex<Option<HashMap<u64, Weak<State>>>> = Mutex::new(None);

impl Inner {
    /// What a bounded queue counts against its capacity: the items waiting and the
    /// ones handed over and not yet acknowledged.
    pub(super) fn held(&self) -> usize {
        self.items.len() + self.handed
    }
}

impl State {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn put(
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
    pub(super) fn hand_over(
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
    pub(super) fn get(
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

    pub(super) fn take(
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
    pub(super) fn poll(&self, ready: impl Fn(&Inner) -> bool) {
        poll::poll_before_blocking(|| ready(&self.lock()).then_some(()));
    }

    /// A remote consumer read the item it was handed: its place is free.
    pub(super) fn acknowledge(&self) {
        let closed = {
            let mut inner = self.lock();
            inner.handed -= 1;
            inner.closed
        };
        self.settled(closed, false);
    }

    /// An item handed over was not read (its consumer's connection dropped, or the
    /// answer could not be written): it goes back to the front, the next one taken.
    pub(super) fn give_back(&self, item: Item) {
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
    pub(super) fn settled(&self, closed: bool, returned: bool) {
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

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
        self.taken.notify_all();
    }

    pub(super) fn wait<'a>(
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

pub(super) fn deadline(wait: Wait) -> Option<Instant> {
    match wait {
        Wait::For(d) => Instant::now().checked_add(d),
        _ => None,
    }
}

impl Item {
    /// No payload (a request or an answer that carries no item).
    pub(super) fn none() -> Self {
        Item {
            bytes: Vec::new(),
            fds: Vec::new(),
        }
    }
}
