//! Substring searches with searchers built once (building a `memmem` searcher per call costs more
//! than searching a small SSE event).

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// A byte string to look for, with its searcher built on first use.
pub(crate) struct Needle(LazyLock<Finder<'static>>);

impl Needle {
    pub(crate) const fn new(build: fn() -> Finder<'static>) -> Self {
        Self(LazyLock::new(build))
    }

    pub(crate) fn found_in(&self, haystack: &[u8]) -> bool {
        self.0.find(haystack).is_some()
    }

    pub(crate) fn positions<'h>(&'h self, haystack: &'h [u8]) -> impl Iterator<Item = usize> + 'h {
        self.0.find_iter(haystack)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.needle().len()
    }
}

/// `needle!(b"...")`: a static [`Needle`].
macro_rules! needle {
    ($bytes:expr) => {
        $crate::needle::Needle::new(|| memchr::memmem::Finder::new($bytes))
    };
}
pub(crate) use needle;
