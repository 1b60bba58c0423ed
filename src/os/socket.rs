//! The few socket calls std does not offer: a peer's credentials, passing a
//! descriptor (SCM_RIGHTS), waiting for input with a deadline. Every `unsafe` block
//! that queues and pipes need lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Who is at the other end of a connected Unix socket, as the kernel recorded it
/// when the connection was made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
}

pub(crate) fn peer(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable `ucred` and `len` holds its size, as SO_PEERCRED
    // asks; the descriptor is open for the duration (borrowed from `stream`).
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: u32::try_from(cred.pid).unwrap_or(0),
        uid: cred.uid,
    })
}

/// This process's real user id.
pub(crate) fn own_uid() -> u32 {
    // SAFETY: `getuid` takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::getuid() }
}

/// The most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub(crate) const MAX_FDS: usize = 253;

/// Control buffer room for [`MAX_FDS`] descriptors, aligned as `cmsghdr` needs.
type Control = [u64; 132];

/// Sends one byte `tag` with descriptor `fd` attached.
pub(crate) fn send_fd(stream: &UnixStream, tag: u8, fd: RawFd) -> io::Result<()> {
    send_fds(stream, tag, &[fd])
}

/// Sends one byte `tag` with descriptors `fds` attached (at most [`MAX_FDS`]).
pub(crate) fn send_fds(stream: &UnixStream, tag: u8, fds: &[RawFd]) -> io::Result<()> {
    if fds.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one message (1 to {MAX_FDS})", fds.len()),
        ));
    }
    let mut byte = [tag];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control: Control = [0; 132];
    let data = u32::try_from(size_of_val(fds)).expect("at most MAX_FDS descriptors");
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(data) } as usize;
    debug_assert!(space <= size_of_val(&control));
    // SAFETY: an all-zero `msghdr` is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at `control`, which is at least `space` bytes and aligned
    // for `cmsghdr`, so CMSG_FIRSTHDR returns a pointer inside it (not null, since
    // `msg_controllen` covers one header), and CMSG_DATA points at room for
    // `fds.len()` descriptors (CMSG_SPACE of their size), written unaligned.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data) as usize;
        let at = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(at.add(i), *fd);
        }
    }
    loop {
        // SAFETY: `msg` and everything it points to (`iov`, `byte`, `control`) live
        // until the call returns; the kernel only reads them.
        let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one byte and, if one came with it, a descriptor (owned from now on,
/// close-on-exec).
pub(crate) fn recv_fd(stream: &UnixStream) -> io::Result<(u8, Option<OwnedFd>)> {
    let (tag, fds) = recv_fds(stream)?;
    Ok((tag, fds.into_iter().next()))
}

/// Receives one byte and the descriptors that came with it (owned from now on,
/// close-on-exec).
pub(crate) fn recv_fds(stream: &UnixStream) -> io::Result<(u8, Vec<OwnedFd>)> {
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control: Control = [0; 132];
    // SAFETY: an all-zero `msghdr` is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    let received = loop {
        // SAFETY: `msg` points at `iov` (one writable byte) and `control` (writable,
        // aligned for `cmsghdr`, its size in `msg_controllen`), all alive across the
        // call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_control`/`msg_controllen` within `control`;
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk only inside that length, and an SCM_RIGHTS
    // header's data holds `(cmsg_len - CMSG_LEN(0)) / size_of::<RawFd>()`
    // descriptors this process now owns, each taken once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                let at = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(at.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    if received == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other side closed the connection",
        ));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more descriptors came than one message may carry",
        ));
    }
    Ok((byte[0], fds))
}

/// Waits until `stream` has input (or end-of-file) to read, at most `timeout`
/// (`None`: forever). `false` when the time ran out.
pub(crate) fn wait_readable(stream: &UnixStream, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let millis = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                // Round up, so a short wait is not a busy loop.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        let mut fds = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fds` is one valid `pollfd`, alive across the call.
        let n = unsafe { libc::poll(&raw mut fds, 1, millis) };
        if n > 0 {
            return Ok(true);
        }
        if n == 0 {
            if deadline.is_none_or(|d| std::time::Instant::now() >= d) {
                return Ok(false);
            }
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `SO_SNDBUF` of a fresh `SOCK_SEQPACKET` socket, measured independently of
/// ipc-channel (for the transport's tests).
#[cfg(test)]
pub(crate) fn fresh_socket_send_buffer() -> usize {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors `socketpair` writes.
    let made =
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(made, 0);
    let mut size: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `size` and `len` are valid for writes of the sizes `len` states.
    let got = unsafe {
        libc::getsockopt(
            fds[0],
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw mut size).cast(),
            &raw mut len,
        )
    };
    for fd in fds {
        // SAFETY: `fd` came from `socketpair` above and is closed once.
        unsafe { libc::close(fd) };
    }
    assert_eq!(got, 0);
    usize::try_from(size).unwrap()
}
