//! Records the commit loadgen was built from: the same script as chorus's
//! (see ../build.rs), so both binaries describe their build alike.

include!("../build.rs");
