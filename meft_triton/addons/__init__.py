"""Add-ons beside MEFT: IST layer selection (:mod:`.ist`) and the SMT baseline (:mod:`.smt`)."""
