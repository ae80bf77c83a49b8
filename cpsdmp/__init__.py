"""
cpsdmp: the French DMP (Dossier Médical Partagé) from an integrator's backend,
authenticated with the CPS card that stays in the professional's workstation.
"""

__version__ = "0.1.0"
