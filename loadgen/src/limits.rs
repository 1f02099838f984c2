//! Thousands of sockets from one process: raise the open-files soft limit
//! to the hard limit, and say up front when a run cannot fit under it.

use anyhow::{bail, Result};

/// Raise RLIMIT_NOFILE's soft limit to its hard limit; returns the new soft
/// limit.
pub fn raise_nofile() -> std::io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Fail early when `connections` sockets (plus some slack for the runtime,
/// stdio and /proc reads) cannot be open at once.
pub fn check_fd_budget(connections: usize) -> Result<u64> {
    let limit: u64 = raise_nofile()?;
    let need = connections as u64 + 64;
    if need > limit {
        bail!(
            "{connections} connections need about {need} open files but this process may hold \
             at most {limit} (RLIMIT_NOFILE hard limit); run fewer connections or several \
             loadgen processes"
        );
    }
    Ok(limit)
}
