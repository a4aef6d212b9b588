"""`vienna authority`: one approval and signing service for a fleet of sidecars (DESIGN.md §11)."""
