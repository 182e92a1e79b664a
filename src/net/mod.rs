//! Sockets, below any protocol: binding with the kernel's backlog, per-port budgets of open and
//! not-yet-admitted sockets, one accept loop, and closing connections that hold a socket
//! without using it. Used by all three ports (HTTP, gRPC, admin).

pub mod idle;
pub mod listen;

pub use idle::{ActiveGuard, Activity, Guarded, Registry, Timeouts, Tracked};
pub use listen::{Admission, Budget, EVICT_AFTER, Gate, Policy, Refusal, accept_loop, bind};
