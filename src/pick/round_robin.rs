//! Round robin: endpoint `ticket mod n` of the routable list.
//!
//! The ticket comes from the service slot's shared cursor (`fetch_add`), so sequential
//! callers see an exact rotation and concurrent callers each get a distinct ticket (fair to
//! within one rotation). The cursor outlives table versions: a republish does not restart
//! the rotation at the first endpoint.
#![deny(unsafe_code)]

/// Index for `ticket` over `n > 0` routable endpoints.
#[inline]
pub(crate) fn index(ticket: usize, n: usize) -> usize {
    ticket % n
}
