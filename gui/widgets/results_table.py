"""The results table: a Qt model over the ledger's runs of one model, as `core.results` shapes
them (Δ% vs baseline, × smaller, × faster)."""
from __future__ import annotations

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt, Signal
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableView

from core.results import COLUMNS, cell

MAX_TEXT_COLUMN = 340  # px
STATUS_COLOURS = {"failed": QColor("#c62828"), "cancelled": QColor("#8d6e63"),
                  "interrupted": QColor("#ef6c00"), "running": QColor("#1565c0")}


class ResultsModel(QAbstractTableModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.rows: list[dict] = []
        self.eval_key: str | None = None

    def set_rows(self, rows: list[dict], eval_key: str | None = None) -> None:
        self.beginResetModel()
        self.rows, self.eval_key = list(rows), eval_key
        self.endResetModel()

    def comparable(self, row: dict) -> bool:
        """Measured under the current eval settings (those are the plot's)."""
        return self.eval_key is None or row.get("eval_key") == self.eval_key

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.DisplayRole):
        if orientation != Qt.Horizontal:
            return None
        if role == Qt.DisplayRole:
            return COLUMNS[section].header
        if role == Qt.ToolTipRole:
            return COLUMNS[section].tip
        return None

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid():
            return None
        row, col = self.rows[index.row()], COLUMNS[index.column()]
        if role == Qt.DisplayRole:
            return cell(row, col)
        if role == Qt.TextAlignmentRole:
            return int((Qt.AlignRight if col.numeric else Qt.AlignLeft) | Qt.AlignVCenter)
        if role == Qt.ForegroundRole:
            colour = STATUS_COLOURS.get(row["status"])
            if colour is not None and col.key in ("status", "error"):
                return colour
            if not self.comparable(row):
                return QColor("#9e9e9e")
            if col.key == "delta_ppl_pct" and row.get("delta_ppl_pct") is not None:
                return QColor("#c62828") if row["delta_ppl_pct"] > 5 else None
        if role == Qt.FontRole and row["baseline"]:
            f = QFont()
            f.setBold(True)
            return f
        if role == Qt.ToolTipRole:
            tip = row.get("error") or row["label"]
            return tip if self.comparable(row) else tip + "\n(other eval settings: not on the plot)"
        if role == Qt.UserRole:
            return row["id"]
        return None

    def row_of(self, run_id: str | None) -> int:
        return next((i for i, r in enumerate(self.rows) if r["id"] == run_id), -1)


class ResultsTable(QTableView):
    """Emits `selected(run_id or "")` when the user picks a row."""
    selected = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.results = ResultsModel(self)
        self.setModel(self.results)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setSelectionMode(QAbstractItemView.SingleSelection)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.setAlternatingRowColors(True)
        self.setWordWrap(False)
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(22)
        h = self.horizontalHeader()
        h.setSectionResizeMode(QHeaderView.Interactive)
        h.setStretchLastSection(True)
        self.selectionModel().selectionChanged.connect(self._changed)

    def set_rows(self, rows: list[dict], eval_key: str | None = None) -> None:
        keep = self.selected_id()
        self.blockSignals(True)
        self.results.set_rows(rows, eval_key)
        self.blockSignals(False)
        self.fit_columns()
        self.select_id(keep, emit=False)

    def fit_columns(self) -> None:
        """Columns fit their contents; long recipes are cut (the tooltip has them whole)."""
        self.resizeColumnsToContents()
        for i, col in enumerate(COLUMNS):
            if not col.numeric and self.columnWidth(i) > MAX_TEXT_COLUMN:
                self.setColumnWidth(i, MAX_TEXT_COLUMN)

    def selected_id(self) -> str:
        idx = self.selectionModel().selectedRows()
        return self.results.rows[idx[0].row()]["id"] if idx else ""

    def selected_row(self) -> dict | None:
        i = self.results.row_of(self.selected_id())
        return self.results.rows[i] if i >= 0 else None

    def select_id(self, run_id: str | None, emit: bool = True) -> None:
        i = self.results.row_of(run_id)
        self.blockSignals(not emit)
        if i < 0:
            self.clearSelection()
        else:
            self.selectRow(i)
            self.scrollTo(self.results.index(i, 0))
        self.blockSignals(False)

    def _changed(self, *_):
        self.selected.emit(self.selected_id())
