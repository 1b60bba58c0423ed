//! What `/proc` says about processes: a process's parent, this process's command line.

/// The parent of process `pid`, from `/proc/<pid>/stat`; `None` when it is gone.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// This process's command-line arguments after the program name, as raw bytes.
///
/// Read from `/proc/self/cmdline` rather than `std::env::args`, which is not yet set
/// up when code runs from a constructor before `main`.
pub(crate) fn own_arguments() -> Option<Vec<Vec<u8>>> {
    let cmdline = std::fs::read("/proc/self/cmdline").ok()?;
    Some(
        cmdline
            .split(|&b| b == 0)
            .skip(1)
            .map(<[u8]>::to_vec)
            .collect(),
    )
}
