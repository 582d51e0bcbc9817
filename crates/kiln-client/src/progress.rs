//! Progress bars on stderr for large transfers (only on a terminal).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Transfers smaller than this get no progress bar.
pub const PROGRESS_MIN_BYTES: u64 = 8 << 20;

/// A byte-count bar drawn on stderr when `enabled` and `total` is large,
/// else a hidden bar (all updates are no-ops).
pub fn bytes_bar(enabled: bool, total: u64, message: &'static str) -> ProgressBar {
    if !enabled || total < PROGRESS_MIN_BYTES {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}
