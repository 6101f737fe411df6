//! The clusters Cube runs work on (being moved here from the scheduler).
