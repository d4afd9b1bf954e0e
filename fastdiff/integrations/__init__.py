"""Adapters to other libraries' formats, one subpackage per library, each imported only when used.

The core (plan, loop, ops) never imports these: it speaks only its own terms, and an adapter
translates at the edge (DESIGN.md section 2).
"""
