//! The creating process's side of a remote handle's connection: a thread that
//! serves its requests until it hangs up.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Weak;
use std::time::Duration;

use crate::channels::broker::{self};
use crate::os::socket;

use super::frame::{
    ACK, CLOSE, CLOSED, EMPTY, FULL, GET, ITEM, OK, PUT, TIMED_OUT, poll_readable, read_frame,
    write_frame,
};
use super::state::{Item, QUEUES, Refusal, State, Wait};

/// Serves one remote handle's connection in the creating process, until it hangs up.
pub(super) fn serve(id: u64, mut stream: UnixStream) {
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
pub(super) struct Handed<'a> {
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

pub(super) fn write_refusal(stream: &mut UnixStream, refusal: Refusal) -> io::Result<()> {
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
pub(super) fn peer_alive(stream: &UnixStream) -> bool {
    !matches!(
        socket::wait_readable(stream, Some(Duration::ZERO)),
        Ok(true) | Err(_)
    )
}
