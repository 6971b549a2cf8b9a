"""Victim models behind one interface (models.base.VictimModel)."""
