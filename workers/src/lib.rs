//! The worker SDK: advertise task types and labels, bid or claim, heartbeat, finish; and the
//! built-in workers (shell command, echo / no-op).
