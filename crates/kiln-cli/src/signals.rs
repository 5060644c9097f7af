//! The signals `kiln` receives. While a guest process is attached (`run` in the foreground,
//! `exec`), SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to it, as
//! `docker run` does; a third SIGINT gives up and leaves it running. Otherwise they end `kiln` as
//! their default action would.
//!
//! The signals are blocked in every thread (the mask is set before any thread starts) and taken by
//! one thread with `sigwait`, so no thread is ever interrupted in the middle of a store update.
//! Programs `kiln` starts get an empty mask again (std and the VMM launcher reset it).

use std::sync::{Arc, Mutex, Weak};

use kiln_agent_proto::Process;

const FORWARDED: [libc::c_int; 6] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

/// Interrupts after which `kiln` stops forwarding and exits.
const GIVE_UP_AFTER_INTERRUPTS: u32 = 3;

/// The attached process, if any, and the interrupts it got.
static ATTACHED: Mutex<Option<(Weak<Process>, u32)>> = Mutex::new(None);

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it and sigaddset only adds valid,
    // constant signal numbers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks the signals and starts the thread that takes them. Call first in `main`, before any
/// other thread exists. On failure `kiln` keeps the default signal behaviour.
pub fn install() {
    let set = forwarded_set();
    // SAFETY: a valid, initialised set; the old mask is not needed.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } == 0;
    if !blocked {
        return;
    }
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: a valid set of blocked signals and a place for the one taken.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        handle(sig);
    });
    if spawned.is_err() {
        // Nobody would take them: let them act by default again.
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

fn handle(sig: libc::c_int) {
    let mut attached = ATTACHED.lock().unwrap_or_else(|p| p.into_inner());
    let target = attached.as_mut().and_then(|(process, interrupts)| {
        let process = process.upgrade()?;
        if sig == libc::SIGINT {
            *interrupts += 1;
        }
        Some((process, *interrupts))
    });
    match target {
        Some((_, interrupts)) if interrupts >= GIVE_UP_AFTER_INTERRUPTS => {
            eprintln!(
                "kiln: interrupted {interrupts} times: leaving; the process keeps running in the guest"
            );
            std::process::exit(128 + sig);
        }
        Some((process, _)) => {
            let _ = process.signal(sig);
        }
        None => {
            drop(attached);
            die_by(sig);
        }
    }
}

/// Ends `kiln` by `sig`'s default action, so its parent sees the signal (a shell prints nothing
/// for SIGINT and reports 130).
fn die_by(sig: libc::c_int) -> ! {
    // SAFETY: restoring the default action of a valid signal, unblocking it in this thread and
    // sending it to this thread: the process ends the way the signal ends it by default.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        let mut one: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut one);
        libc::sigaddset(&mut one, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
        libc::raise(sig);
    }
    // Only reached for a signal whose default is to be ignored (none of FORWARDED).
    std::process::exit(128 + sig)
}

/// Forwards signals to `process` while this lives.
pub struct Forwarding(());

impl Forwarding {
    pub fn to(process: &Arc<Process>) -> Forwarding {
        *ATTACHED.lock().unwrap_or_else(|p| p.into_inner()) = Some((Arc::downgrade(process), 0));
        Forwarding(())
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        *ATTACHED.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
