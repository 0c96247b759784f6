//! Values kept in memory rather than in registers, on purpose.
//!
//! The eBPF verifier tracks every register's exact range but not the contents of map values. A loop
//! cursor, length or counter that lives in the per-CPU scratch map and is read back through a volatile
//! load is therefore an unknown value to the verifier: each loop iteration starts from one state
//! instead of one per path taken so far, and code after a loop is verified once rather than once per
//! way out of it. (The DNS parser exceeded the 1M-instruction limit without this.) On the host these
//! are plain reads and writes.

/// Reads `cell` from memory.
#[inline(always)]
pub fn get(cell: &u32) -> u32 {
    // SAFETY: a volatile read through a valid reference.
    unsafe { core::ptr::read_volatile(cell) }
}

/// Writes `value` to `cell` in memory.
#[inline(always)]
pub fn set(cell: &mut u32, value: u32) {
    // SAFETY: a volatile write through a valid, exclusive reference.
    unsafe { core::ptr::write_volatile(cell, value) }
}
