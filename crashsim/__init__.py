"""crashsim: exhaustive crash simulation of qjournal's journaled operations (see DESIGN.md)."""
