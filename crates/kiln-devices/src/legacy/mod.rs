//! Legacy x86 devices a Linux guest expects: COM1 serial, the i8042 controller (reset and
//! Ctrl-Alt-Del) and Firecracker's boot timer.

pub mod boot_timer;
pub mod i8042;
pub mod serial;
