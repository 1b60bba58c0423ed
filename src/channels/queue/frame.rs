//! One request or answer on a remote handle's connection: a frame, then the
//! descriptors of the shared inputs its item names.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::os::{poll, socket};

use super::state::Item;

// Requests.
pub(super) const PUT: u8 = 1;
pub(super) const GET: u8 = 2;
pub(super) const CLOSE: u8 = 3;
/// The consumer has read the item it was handed last on this connection (no answer).
pub(super) const ACK: u8 = 4;
// Answers.
pub(super) const OK: u8 = 10;
pub(super) const ITEM: u8 = 11;
pub(super) const FULL: u8 = 12;
pub(super) const EMPTY: u8 = 13;
pub(super) const TIMED_OUT: u8 = 14;
pub(super) const CLOSED: u8 = 15;

/// Polls `stream` briefly for something to read, so that a reply or request that
/// follows at once is read without blocking (and without the slow wake-up that
/// follows a block on this VM); returns either way, the caller then reads.
pub(super) fn poll_readable(stream: &UnixStream) {
    poll::poll_before_blocking(|| {
        matches!(
            socket::wait_readable(stream, Some(Duration::ZERO)),
            Ok(true) | Err(_)
        )
        .then_some(())
    });
}

/// Writes one frame: `length (u32) | tag (u8) | wait (u64) | descriptors (u16) |
/// payload`, then, when the item carries descriptors, one byte with them attached
/// (SCM_RIGHTS). The reader reads exactly the frame's bytes before it receives
/// that byte, so a plain read never swallows the descriptors.
pub(super) fn write_frame(
    stream: &mut UnixStream,
    tag: u8,
    wait: u64,
    item: &Item,
) -> io::Result<()> {
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

pub(super) fn read_frame(stream: &mut UnixStream) -> io::Result<(u8, u64, Item)> {
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
pub(super) const HEADER: usize = 15;
