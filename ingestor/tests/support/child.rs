//! A spawned process that is killed and reaped when the test lets go of it.

use std::process::Child;

/// Killed and reaped on drop.
pub struct KilledOnDrop(pub Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
