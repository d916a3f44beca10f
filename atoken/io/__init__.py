"""Reading inputs safely: one reader per media kind, one table of file extensions, and the work
budgets checked from file headers before anything is decoded."""
